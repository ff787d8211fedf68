"""Tier 2: the `moegen` command. Exit codes (0 ok, 1 verification mismatch, 2 bad input), one-line error
messages naming what is wrong and what is allowed, and nothing half-written under the output directory.

Most cases run in-process through click's CliRunner; a few run the real console script
(.venv/bin/moegen) or `python -m moegen.cli` in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import NO_TVM_PRELUDE, DEFAULT_TARGET, SPECS
from moegen.artifact import MANIFEST, load_tensor, read_manifest, save_tensor, sha256_file
from moegen.cli import main
from moegen.spec import ACTIVATIONS, DTYPES, SCORINGS, SUPPORTED_QUANT
from moegen.targets import available_targets

SUBCOMMANDS = ("build", "verify", "inspect", "bench", "tune")
MOEGEN = Path(sys.executable).parent / "moegen"  # the console script of this venv


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def tree(root: Path) -> list[str]:
    """Every path under root (files and directories, hidden ones included), relative, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def leftovers(root: Path) -> list[str]:
    """Temporary or replaced artifact directories the build must never leave behind."""
    return [p for p in tree(root) if any(part.startswith(".") or ".tmp-" in part or ".old-" in part
                                          for part in p.split("/"))]


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    return lines[0]


def write_spec(path: Path, **changes) -> Path:
    data = yaml.safe_load((SPECS / "tiny.yaml").read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(yaml.safe_dump(data))
    return path


# ---- help ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_main_help(flag):
    r = invoke(flag)
    assert r.exit_code == 0, r.output
    assert "Usage" in r.stdout
    for cmd in SUBCOMMANDS:
        assert cmd in r.stdout


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_subcommand_help(cmd):
    r = invoke(cmd, "--help")
    assert r.exit_code == 0, r.output
    assert "Usage" in r.stdout and cmd in r.stdout
    assert r.stderr == ""


def test_help_of_the_real_command():
    assert MOEGEN.is_file(), f"no console script at {MOEGEN}"
    for argv in ([str(MOEGEN), "--help"], [sys.executable, "-m", "moegen.cli", "--help"],
                 [str(MOEGEN), "build", "--help"], [sys.executable, "-m", "moegen.cli", "verify", "--help"]):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, (argv, p.stderr)
        assert "Usage" in p.stdout, argv


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0
    import moegen

    assert moegen.__version__ in r.stdout


# ---- build: bad input ------------------------------------------------------------------------

# field in the file -> (value, field named in the message, fragments of the allowed values)
BAD_FIELDS = {
    "activation": ("swish", "activation", ACTIVATIONS),
    "dtype": ("float64", "dtype", DTYPES),
    "top_k": (9, "top_k", ("num_experts", "8")),
    "hidden_size": (0, "hidden_size", (">= 1",)),
    "intermediate_size": ("96", "intermediate_size", ("integer",)),
    "router": ({"scoring": "relu"}, "router.scoring", SCORINGS),
    "quant": ({"scheme": "int4_w4a16"}, "quant.scheme", SUPPORTED_QUANT),
    "hiden_size": (128, "hiden_size", ("hidden_size", "num_experts")),
    "name": ("bad name/..", "name", ("letters",)),
}


@pytest.mark.parametrize("out_exists", [False, True], ids=["out-absent", "out-empty"])
@pytest.mark.parametrize("field", list(BAD_FIELDS))
def test_build_bad_spec_field(field, out_exists, tmp_path):
    value, named, allowed = BAD_FIELDS[field]
    spec = write_spec(tmp_path / "bad.yaml", **{field: value})
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
    r = invoke("build", spec, "--target", DEFAULT_TARGET, "-o", out)
    assert r.exit_code == 2, r.output
    line = one_line(r.stderr)
    assert f"'{named}'" in line, line
    shown = value["scheme"] if field == "quant" else value["scoring"] if field == "router" else value
    assert repr(shown) in line, line
    for a in allowed:
        assert a in line, f"allowed value {a!r} not in: {line}"
    assert r.stdout == ""
    assert tree(out) == [], f"written under -o: {tree(out)}"
    assert out.exists() == out_exists


def test_build_bad_field_real_command(tmp_path):
    """The console script: exit status 2 and one line on the real stderr, nothing on stdout."""
    spec = write_spec(tmp_path / "bad.yaml", activation="swish")
    out = tmp_path / "out"
    p = subprocess.run([str(MOEGEN), "build", str(spec), "-t", DEFAULT_TARGET, "-o", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    line = one_line(p.stderr)
    assert "activation" in line and "'swish'" in line and all(a in line for a in ACTIVATIONS), line
    assert p.stdout == ""
    assert not out.exists()


@pytest.mark.parametrize("target", ["cuda", "cpu", "cpu-avx512 ", "../targets/cpu-avx512"])
def test_build_unknown_target(target, tmp_path):
    out = tmp_path / "out"
    r = invoke("build", SPECS / "tiny.yaml", "--target", target, "-o", out)
    assert r.exit_code == 2, r.output
    line = one_line(r.stderr)
    assert "--target" in line and repr(target) in line, line
    targets = available_targets()
    assert DEFAULT_TARGET in targets
    for t in targets:
        assert t in line, line
    assert not out.exists()


def test_build_without_target(tmp_path):
    r = invoke("build", SPECS / "tiny.yaml", "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "--target" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["missing", "invalid-yaml", "not-a-mapping", "empty"])
def test_build_unreadable_spec(kind, tmp_path):
    spec = tmp_path / "spec.yaml"
    if kind == "invalid-yaml":
        spec.write_text("name: tiny\nhidden_size: [128\n")
    elif kind == "not-a-mapping":
        spec.write_text("- 1\n- 2\n")
    elif kind == "empty":
        spec.write_text("")
    out = tmp_path / "out"
    r = invoke("build", spec, "--target", DEFAULT_TARGET, "-o", out)
    assert r.exit_code == 2, r.output
    line = one_line(r.stderr)
    if kind in ("missing", "invalid-yaml"):
        assert str(spec) in line, line
    assert not out.exists()


# ---- build: good builds ----------------------------------------------------------------------


def test_build_real_command(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([str(MOEGEN), "build", str(SPECS / "tiny.yaml"), "--target", DEFAULT_TARGET, "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    steps = [ln for ln in p.stdout.splitlines() if "[" in ln and "/5]" in ln]
    assert [ln.strip()[:5] for ln in steps] == [f"[{i}/5]" for i in range(1, 6)], p.stdout
    root = out / "tiny" / DEFAULT_TARGET
    assert (root / MANIFEST).is_file()
    assert str(root) in p.stdout.splitlines()[-1]
    m = read_manifest(root)  # hashes of every listed file check out
    assert m["spec"]["name"] == "tiny" and m["target"]["name"] == DEFAULT_TARGET
    assert tree(out) == sorted(["tiny", f"tiny/{DEFAULT_TARGET}"] + [f"tiny/{DEFAULT_TARGET}/{f}" for f in
                                                                    tree(root)])
    assert leftovers(out) == []


def test_rebuild_replaces_the_artifact(tmp_path):
    out = tmp_path / "out"
    spec = SPECS / "tiny.yaml"
    r = invoke("build", spec, "-t", DEFAULT_TARGET, "-o", out)
    assert r.exit_code == 0, r.output
    root = out / "tiny" / DEFAULT_TARGET
    first = read_manifest(root)
    (root / "stale-marker").write_text("from the first build")
    r = invoke("build", spec, "-t", DEFAULT_TARGET, "-o", out)
    assert r.exit_code == 0, r.output
    assert [f"[{i}/5]" in r.stdout for i in range(1, 6)] == [True] * 5
    assert not (root / "stale-marker").exists(), "the rebuild merged into the old directory"
    second = read_manifest(root)
    assert second["spec_hash"] == first["spec_hash"]
    assert sorted(p.name for p in (out / "tiny").iterdir()) == [DEFAULT_TARGET]
    assert leftovers(out) == []


def test_failed_rebuild_keeps_the_old_artifact(tmp_path, monkeypatch):
    out = tmp_path / "out"
    r = invoke("build", SPECS / "tiny.yaml", "-t", DEFAULT_TARGET, "-o", out)
    assert r.exit_code == 0, r.output
    root = out / "tiny" / DEFAULT_TARGET
    before = {p: sha256_file(root / p) for p in tree(root) if (root / p).is_file()}

    import moegen.build

    def boom(*a, **k):
        raise RuntimeError("injected failure after the library was written")

    monkeypatch.setattr(moegen.build, "golden_data", boom)
    r = invoke("build", SPECS / "tiny.yaml", "-t", DEFAULT_TARGET, "-o", out)
    assert r.exit_code != 0
    assert {p: sha256_file(root / p) for p in tree(root) if (root / p).is_file()} == before
    read_manifest(root)
    assert leftovers(out) == []


def test_failed_first_build_writes_no_files(tmp_path, monkeypatch):
    import moegen.build

    def boom(*a, **k):
        raise RuntimeError("injected failure after the library was written")

    monkeypatch.setattr(moegen.build, "golden_data", boom)
    out = tmp_path / "out"
    r = invoke("build", SPECS / "tiny.yaml", "-t", DEFAULT_TARGET, "-o", out)
    assert r.exit_code != 0
    assert [p for p in tree(out) if (out / p).is_file()] == []
    assert not (out / "tiny" / DEFAULT_TARGET).exists()
    assert leftovers(out) == []


# ---- verify ----------------------------------------------------------------------------------


def _case_lines(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if ln.startswith(("golden ", "random "))]


@pytest.mark.parametrize("name", ["tiny", "deepseek-v3-small"])
def test_verify_good_artifact(name, artifact):
    root = artifact(name)
    m = json.loads((root / MANIFEST).read_text())
    tokens = [0, 1, 7, 129]
    r = invoke("verify", root, "--tokens", ",".join(map(str, tokens)))
    assert r.exit_code == 0, r.output
    lines = _case_lines(r.stdout)
    n_out = 2 if m["spec"]["shared_experts"] else 1
    golden = [ln for ln in lines if ln.startswith("golden ")]
    random_ = [ln for ln in lines if ln.startswith("random ")]
    assert len(golden) == sum(len(s["outputs"]) for s in m["golden"]["sets"]) == 3 * n_out
    assert len(random_) == len(tokens) * n_out
    for T in tokens:
        assert sum(f"T={T} " in ln for ln in random_) == n_out, (T, random_)
    for ln in lines:
        assert ln.rstrip().endswith("ok") and "MISMATCH" not in ln, ln
    assert "within tolerance" in r.stdout.splitlines()[-1]
    assert r.stderr == ""


def test_verify_no_golden(artifact):
    r = invoke("verify", artifact("tiny"), "--no-golden", "--tokens", "3")
    assert r.exit_code == 0, r.output
    lines = _case_lines(r.stdout)
    assert len(lines) == 1 and lines[0].startswith("random T=3 ") and lines[0].rstrip().endswith("ok")


@pytest.mark.parametrize("tokens", ["1,x", "x", "", "1,-2", "1.5", ","])
def test_verify_bad_tokens(tokens, artifact):
    r = invoke("verify", artifact("tiny"), "--tokens", tokens)
    assert r.exit_code == 2, r.output
    assert "--tokens" in r.stderr and repr(tokens) in r.stderr, r.stderr
    assert _case_lines(r.stdout) == []


def test_verify_corrupted_library(artifact_copy):
    root = artifact_copy("tiny")
    data = bytearray((root / "moe.so").read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / "moe.so").write_bytes(bytes(data))
    r = invoke("verify", root)
    assert r.exit_code == 2, r.output
    line = one_line(r.stderr)
    assert str(root / "moe.so") in line, line
    assert _case_lines(r.stdout) == []


@pytest.mark.parametrize("damage", ["manifest-missing", "manifest-invalid", "format-version", "file-missing"])
def test_verify_damaged_artifact(damage, artifact_copy):
    root = artifact_copy("tiny")
    mpath = root / MANIFEST
    if damage == "manifest-missing":
        mpath.unlink()
        named = MANIFEST
    elif damage == "manifest-invalid":
        mpath.write_text(mpath.read_text().replace('"files"', '"files" "'))
        named = str(mpath)
    elif damage == "format-version":
        m = json.loads(mpath.read_text())
        m["format_version"] = 0
        mpath.write_text(json.dumps(m))
        named = str(mpath)
    else:
        (root / "golden" / "test_data_set_1" / "input_1.pb").unlink()
        named = str(root / "golden" / "test_data_set_1" / "input_1.pb")
    r = invoke("verify", root)
    assert r.exit_code == 2, r.output
    assert named in one_line(r.stderr)


def test_verify_wrong_golden_numbers(artifact_copy):
    """Golden output edited and its manifest hash updated: only the numbers are wrong -> exit 1."""
    root = artifact_copy("tiny")
    m = json.loads((root / MANIFEST).read_text())
    target_set = m["golden"]["sets"][-1]
    rel = f"{target_set['dir']}/output_0.pb"
    good = load_tensor(root / rel)
    save_tensor(good * 1.25 + 0.01, root / rel)
    assert sha256_file(root / rel) != m["files"][rel]
    m["files"][rel] = sha256_file(root / rel)
    (root / MANIFEST).write_text(json.dumps(m, indent=1))
    read_manifest(root)  # the artifact itself is consistent again

    r = invoke("verify", root, "--tokens", "1,7")
    assert r.exit_code == 1, r.output
    lines = _case_lines(r.stdout)
    bad = [ln for ln in lines if "MISMATCH" in ln]
    assert len(bad) == 1 and bad[0].startswith(f"golden {target_set['dir']} "), lines
    assert all(ln.rstrip().endswith("ok") for ln in lines if ln not in bad)
    assert len(lines) == len(m["golden"]["sets"]) + 2
    assert "FAILED" in r.stderr

    r = invoke("verify", root, "--no-golden", "--tokens", "1,7")  # the kernels themselves are fine
    assert r.exit_code == 0, r.output


# ---- inspect ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deepseek-v3-small", "latent-small"])
def test_inspect(name, artifact):
    root = artifact(name)
    m = json.loads((root / MANIFEST).read_text())
    r = invoke("inspect", root)
    assert r.exit_code == 0, r.output
    out = r.stdout
    first = out.splitlines()[0]
    assert first.split()[0] == name and m["spec_hash"] in first and DEFAULT_TARGET in first
    assert len(m["functions"]) >= 5
    for fn in m["functions"]:
        assert f"  {fn}(" in out, fn
    for p in m["paths"]:
        assert any(ln.split()[:1] == [p["name"]] for ln in out.splitlines()), p["name"]
    for rel in m["files"]:
        assert rel in out, rel
    if m["spec"]["shared_experts"]:
        assert "shared experts" in out
    if m["spec"]["latent_size"]:
        assert f"latent size: {m['spec']['latent_size']}" in out
    assert r.stderr == ""


def test_inspect_not_an_artifact(tmp_path):
    r = invoke("inspect", tmp_path)
    assert r.exit_code == 2
    assert str(tmp_path) in one_line(r.stderr)


# ---- verify on a deploy box (no apache-tvm) --------------------------------------------------

CHILD = NO_TVM_PRELUDE + textwrap.dedent(r'''

    from moegen.cli import main

    for args in (["verify", sys.argv[1], "--tokens", "1,17"], ["inspect", sys.argv[1]]):
        try:
            main(args)
        except SystemExit as e:
            if e.code not in (0, None):
                raise
    assert "tvm" not in sys.modules
    print("CHILD DONE")
''')


def test_verify_and_inspect_without_apache_tvm(artifact, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    p = subprocess.run([sys.executable, str(script), str(artifact("latent-small"))], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.splitlines()[-1] == "CHILD DONE"
    assert "all cases within tolerance" in p.stdout
    assert len([ln for ln in _case_lines(p.stdout) if ln.rstrip().endswith("ok")]) == 2 * (3 + 2)
