"""Load an artifact: check the manifest and the device, load TVM's runtime library if the artifact
carries one, then the kernel library through tvm-ffi. Imports tvm_ffi and torch only, never apache-tvm.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from ..artifact import ArtifactError, read_manifest

_RUNTIME_LIBS: dict[str, ctypes.CDLL] = {}


def cpu_flags() -> set[str]:
    """The host CPU's feature flags (Linux /proc/cpuinfo); empty when unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def check_device(manifest: dict, device: torch.device) -> None:
    """Refuse an artifact this device cannot run, with the reason."""
    tgt = manifest["target"]
    if tgt["family"] == "cpu":
        if device.type != "cpu":
            raise ArtifactError(f"artifact for {tgt['name']} runs on the CPU, not on {device}; "
                                "build one for a cuda-* target")
        have = cpu_flags()
        missing = [f for f in tgt.get("requires_cpu_flags", []) if have and f not in have]
        if missing:
            raise ArtifactError(f"artifact for {tgt['name']} needs CPU features {', '.join(missing)} that this "
                                "CPU lacks; build for cpu-x86-64-v3 instead")
    elif tgt["family"] == "cuda":
        if device.type != "cuda":
            raise ArtifactError(f"artifact for {tgt['name']} runs on a CUDA GPU, not on {device}")
        if not torch.cuda.is_available():
            raise ArtifactError(f"artifact for {tgt['name']} needs a CUDA GPU, and torch sees none")
        need = tuple(tgt.get("compute_capability") or (0, 0))
        have = torch.cuda.get_device_capability(device)
        if tgt.get("exact_capability") and tuple(have) != need:
            raise ArtifactError(f"artifact for {tgt['name']} holds {need[0]}.{need[1]}-only code (wgmma, sm_"
                                f"{need[0]}{need[1]}a) and {torch.cuda.get_device_name(device)} is {have[0]}.{have[1]}: "
                                f"build for its architecture without wgmma paths")
        if have < need:
            raise ArtifactError(f"artifact for {tgt['name']} needs compute capability {need[0]}.{need[1]} or newer; "
                                f"{torch.cuda.get_device_name(device)} is {have[0]}.{have[1]}: build for its "
                                f"architecture (cuda-sm{have[0]}{have[1]})")
    else:
        raise ArtifactError(f"artifact target family {tgt['family']!r} is not supported by this runner")


def _installed_twin(path: Path) -> Path:
    """The same library from an installed apache-tvm, when there is one with identical bytes.

    Two copies of libtvm_runtime in one process register the same global functions and abort it; by
    loading the installed file, a later `import tvm` (a build after a load) reuses the loaded copy.
    Found without importing tvm."""
    import importlib.util

    from ..artifact import sha256_file

    try:
        spec = importlib.util.find_spec("tvm")
    except (ImportError, ValueError):  # a blocked or broken apache-tvm: use the artifact's copy
        return path
    if spec is None or spec.origin is None:
        return path
    twin = Path(spec.origin).parent / "lib" / path.name
    if twin.is_file() and sha256_file(twin) == sha256_file(path):
        return twin
    return path


def _load_runtime_library(path: Path) -> None:
    """TVM's runtime provides the thread pool behind T.parallel; without it tvm-ffi crashes on such
    kernels (shared/TVM-NOTES.md). Load it once per process, RTLD_GLOBAL, unless TVM is already here."""
    import tvm_ffi

    # TVM's pool defaults to half the hardware threads and pins its workers, which lands them on the
    # cores torch's OpenMP workers are pinned to: both halve the bandwidth (measured on this 2-core box).
    # The pool reads these at its first parallel kernel, so they count even when TVM is already loaded.
    os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    if path.name in _RUNTIME_LIBS or tvm_ffi.get_global_func("runtime.NumThreads", allow_missing=True):
        return
    path = _installed_twin(path)
    _RUNTIME_LIBS[path.name] = ctypes.CDLL(str(path), ctypes.RTLD_GLOBAL)


def load_artifact(path, device: torch.device):
    """-> (manifest, tvm_ffi.Module). Checks hashes, format version and the device first."""
    import tvm_ffi

    root = Path(path)
    manifest = read_manifest(root)
    check_device(manifest, device)
    for lib in manifest.get("runtime_libraries", []):
        _load_runtime_library(root / lib)
    try:
        module = tvm_ffi.load_module(str(root / manifest["library"]))
    except Exception as e:  # a library that passed the hash check but cannot load: say which
        raise ArtifactError(f"{root / manifest['library']}: cannot load ({e})") from None
    missing = [f for f in manifest["functions"] if not module.implements_function(f, query_imports=True)]
    if missing:
        raise ArtifactError(f"{root / manifest['library']}: missing functions {missing}")
    return manifest, module
