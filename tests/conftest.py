"""Shared fixtures. Hardware choices live here, not in tests: DEFAULT_TARGET is the widest CPU target this machine runs.

`artifact(name, target)` builds examples/specs/<name>.yaml once per test session and returns the
artifact directory; tests that modify an artifact must copy it first (`artifact_copy`).
"""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "examples" / "specs"


def _native_cpu_target() -> str:
    """The widest CPU target this machine runs (CI and the dev box have AVX-512; others get AVX2)."""
    from moegen.runtime.loader import cpu_flags

    return "cpu-avx512" if "avx512f" in cpu_flags() else "cpu-x86-64-v3"


DEFAULT_TARGET = _native_cpu_target()


@pytest.fixture(scope="session")
def artifact_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def artifact(artifact_root):
    """artifact(spec_name, target=DEFAULT_TARGET) -> Path, built once per session."""
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, target: str = DEFAULT_TARGET) -> Path:
        if (name, target) not in cache:
            from moegen.build import build
            from moegen.spec import load_spec

            cache[(name, target)] = build(load_spec(SPECS / f"{name}.yaml"), target, artifact_root)
        return cache[(name, target)]

    return get


@pytest.fixture
def artifact_copy(artifact, tmp_path):
    """artifact_copy(spec_name, target=DEFAULT_TARGET) -> a private copy a test may damage."""

    def get(name: str, target: str = DEFAULT_TARGET) -> Path:
        dst = tmp_path / name / target
        shutil.copytree(artifact(name, target), dst)
        return dst

    return get


# The start of a child script that runs as on a deploy box: apache-tvm (`tvm`, `tvm.*`) cannot be
# imported, tvm-ffi can. It checks that the blocker works before the test's own lines run.
NO_TVM_PRELUDE = textwrap.dedent(r'''
    import importlib.abc
    import sys


    class NoApacheTVM(importlib.abc.MetaPathFinder):
        """Refuses apache-tvm (`tvm`, `tvm.*`) as on a deploy box; `tvm_ffi` stays importable."""

        def find_spec(self, fullname, path=None, target=None):
            if fullname == "tvm" or fullname.startswith("tvm."):
                raise ImportError(f"apache-tvm is not available in this process ({fullname})")
            return None


    sys.meta_path.insert(0, NoApacheTVM())
    try:
        import tvm  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("CHILD ERROR: `import tvm` succeeded although it is blocked")
''')


def kernel_source(src: str, name: str) -> str:
    """One kernel's definition in an artifact's CUDA source (moe.cu), up to the next kernel."""
    start = src.index(f"{name}_kernel(", src.index(f"{name}_kernel(") + 1)
    end = src.find('extern "C" __global__', start)
    return src[start:end if end > 0 else None]
