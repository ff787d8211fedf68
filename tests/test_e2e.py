"""Tier 2: built artifacts run by the light runner and compared with the PyTorch reference.

The main check loads each small example artifact in a fresh Python process where apache-tvm cannot be
imported (a sys.meta_path finder refuses `tvm` and `tvm.*`, not `tvm_ffi`), as on a deploy box. The rest
runs in-process: the internal gate, empty batches, experts without tokens, chunking above
max_chunk_tokens, and the errors the runner and the artifact loader must raise.

Shape legend: T tokens, E experts, K top-k, H hidden, Hr routed width (L or H), Is shared intermediate.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import NO_TVM_PRELUDE, DEFAULT_TARGET, SPECS
from moegen.artifact import MANIFEST, TOLERANCES, ArtifactError, sha256_file
from moegen.reference import moe_ref, random_weights, route_ref
from moegen.runtime import MoERunner, RunnerInputError
from moegen.spec import load_spec, parse_spec

SMALL_SPECS = ("tiny", "deepseek-v3-small", "gpt-oss-small", "latent-small")
TOKENS = (0, 1, 3, 17, 129, 1000)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative L2 norm of the error (the absolute norm when the reference is all zeros)."""
    want = want.float()
    num = (got.float() - want).norm().item()
    den = want.norm().item()
    return num / den if den > 0 else num


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def expected_shapes(spec, T: int) -> list[tuple[int, int]]:
    """Seed semantics: routed [T, Hr] (Hr = L for a latent layer), or (shared [T, H], routed [T, Hr])."""
    routed = (T, spec.latent_size if spec.latent_size is not None else spec.hidden_size)
    return [(T, spec.hidden_size), routed] if spec.shared_experts is not None else [routed]


def inputs(spec, T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, spec.hidden_size, generator=g).to(getattr(torch, spec.dtype))  # [T, H]
    logits = torch.randn(T, spec.num_experts, generator=g) * 2  # [T, E]
    return x, logits


def check_against_ref(spec, outs, refs, T: int, what: str) -> None:
    outs, refs = as_tuple(outs), as_tuple(refs)
    tol = TOLERANCES[spec.dtype]
    assert [tuple(o.shape) for o in outs] == expected_shapes(spec, T), what
    assert [tuple(r.shape) for r in refs] == expected_shapes(spec, T), what
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.dtype == getattr(torch, spec.dtype), f"{what} output {i}: dtype {o.dtype}"
        assert torch.isfinite(o.float()).all(), f"{what} output {i}: non-finite values"
        err = rel_error(o, r)
        assert err <= tol, f"{what} output {i}: relative error {err:.3e} > {tol:.1e}"


def spy_kernels(runner: MoERunner) -> list[tuple[str, tuple]]:
    """Replace the runner's kernel handles with recorders; returns the (name, first-arg shape) log."""
    calls: list[tuple[str, tuple]] = []
    originals = runner.__dict__.setdefault("_unspied_fns", runner._fns)

    def wrap(name, fn):
        def call(*args):
            calls.append((name, tuple(args[0].shape)))
            return fn(*args)
        return call

    runner._fns = {name: wrap(name, fn) for name, fn in originals.items()}
    return calls


# ---- a fresh process without apache-tvm ------------------------------------------------------

CHILD = NO_TVM_PRELUDE + textwrap.dedent(r'''
    assert "tvm" not in sys.modules

    import json
    from pathlib import Path

    import torch
    import tvm_ffi  # noqa: F401  (the runner's only TVM dependency must still import)

    from moegen.artifact import TOLERANCES
    from moegen.reference import moe_ref, random_weights
    from moegen.runtime import MoERunner
    from moegen.runtime import loader
    from moegen.spec import load_spec

    root, spec_path, seed, tokens = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    spec = load_spec(spec_path)
    weights = random_weights(spec, seed)
    runner = MoERunner.load(root, weights)
    assert runner.spec.hash == spec.hash, (runner.spec.hash, spec.hash)
    dt = getattr(torch, spec.dtype)
    cases = []
    for T in tokens:
        g = torch.Generator().manual_seed(seed * 1000 + T)
        x = torch.randn(T, spec.hidden_size, generator=g).to(dt)
        logits = torch.randn(T, spec.num_experts, generator=g) * 2
        out = runner(x, logits)
        ref = moe_ref(spec, weights, x, logits)
        outs = list(out) if isinstance(out, tuple) else [out]
        refs = list(ref) if isinstance(ref, tuple) else [ref]
        errs = []
        for o, r in zip(outs, refs):
            if tuple(o.shape) != tuple(r.shape):
                errs.append(None)
                continue
            num = (o.float() - r.float()).norm().item()
            den = r.float().norm().item()
            errs.append(num / den if den > 0 else num)
        cases.append({"T": T, "is_tuple": isinstance(out, tuple), "shapes": [list(o.shape) for o in outs],
                      "ref_shapes": [list(r.shape) for r in refs], "dtypes": [str(o.dtype) for o in outs],
                      "finite": [bool(torch.isfinite(o.float()).all()) for o in outs], "errors": errs})
    tvm_modules = sorted(m for m in sys.modules if m == "tvm" or m.startswith("tvm."))
    assert "tvm" not in sys.modules, tvm_modules
    print("RESULT " + json.dumps({"cases": cases, "tol": TOLERANCES[spec.dtype], "tvm_modules": tvm_modules,
                                  "runtime_libs_loaded": sorted(loader._RUNTIME_LIBS)}))
''')


def test_apache_tvm_is_installed_here():
    """The child's failing `import tvm` must come from its blocker, not from a missing package."""
    assert importlib.util.find_spec("tvm") is not None
    assert importlib.util.find_spec("tvm_ffi") is not None


@pytest.mark.parametrize("name", SMALL_SPECS)
def test_artifact_in_a_process_without_tvm(name, artifact, tmp_path):
    root = artifact(name)
    spec = load_spec(SPECS / f"{name}.yaml")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    seed = 7
    # cwd = tmp_path: the child finds moegen as installed, not through the repository checkout
    proc = subprocess.run([sys.executable, str(script), str(root), str(SPECS / f"{name}.yaml"), str(seed),
                           json.dumps(list(TOKENS))], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"child failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout
    res = json.loads(lines[0][len("RESULT "):])
    assert res["tvm_modules"] == []
    manifest = json.loads((root / MANIFEST).read_text())
    # the artifact's own runtime library served the kernels (no TVM in the process to provide one)
    assert res["runtime_libs_loaded"] == sorted(manifest["runtime_libraries"])
    tol = TOLERANCES[spec.dtype]
    assert res["tol"] == tol
    assert [c["T"] for c in res["cases"]] == list(TOKENS)
    for c in res["cases"]:
        T = c["T"]
        want = [list(s) for s in expected_shapes(spec, T)]
        assert c["is_tuple"] == (spec.shared_experts is not None), f"T={T}"
        assert c["shapes"] == want, f"T={T}: runner shapes {c['shapes']}, expected {want}"
        assert c["ref_shapes"] == want, f"T={T}: reference shapes {c['ref_shapes']}"
        assert c["dtypes"] == [str(getattr(torch, spec.dtype))] * len(want), f"T={T}"
        assert all(c["finite"]), f"T={T}: non-finite output"
        for name_, err in zip(("shared", "routed") if len(want) == 2 else ("routed",), c["errors"]):
            assert err is not None and err <= tol, f"T={T} {name_}: relative error {err} > {tol}"


# ---- in-process checks ----------------------------------------------------------------------


@pytest.mark.parametrize("name", SMALL_SPECS)
def test_internal_gate(name, artifact):
    """weights['gate'] (and gpt-oss's gate_bias): the runner computes the logits itself."""
    spec = load_spec(SPECS / f"{name}.yaml")
    weights = random_weights(spec, 11, gate=True)
    if spec.expert_bias:  # gpt-oss: the router has a bias
        weights["gate_bias"] = (torch.randn(spec.num_experts, generator=torch.Generator().manual_seed(3)) * 0.5
                                ).to(getattr(torch, spec.dtype))
    runner = MoERunner.load(artifact(name), weights)
    for T in (0, 1, 17, 129, 1000):
        x, _ = inputs(spec, T, seed=T)
        check_against_ref(spec, runner(x), moe_ref(spec, weights, x), T, f"{name} gate T={T}")
        check_against_ref(spec, runner(x, None), moe_ref(spec, weights, x), T, f"{name} gate T={T} (None)")


@pytest.mark.parametrize("name", SMALL_SPECS)
def test_empty_batch(name, artifact):
    spec = load_spec(SPECS / f"{name}.yaml")
    weights = random_weights(spec, 2)
    runner = MoERunner.load(artifact(name), weights)
    calls = spy_kernels(runner)
    dt = getattr(torch, spec.dtype)
    for logits_dtype in (torch.float32, dt):
        out = as_tuple(runner(torch.empty(0, spec.hidden_size, dtype=dt),
                              torch.empty(0, spec.num_experts, dtype=logits_dtype)))
        assert [tuple(o.shape) for o in out] == expected_shapes(spec, 0)
        assert all(o.dtype == dt for o in out)
    assert calls == []  # nothing to launch for no tokens


def test_empty_batch_with_gate(artifact):
    spec = load_spec(SPECS / "latent-small.yaml")
    weights = random_weights(spec, 2, gate=True)
    out = MoERunner.load(artifact("latent-small"), weights)(torch.empty(0, spec.hidden_size, dtype=torch.bfloat16))
    assert [tuple(o.shape) for o in as_tuple(out)] == expected_shapes(spec, 0)


@pytest.mark.parametrize("name,T,hot", [
    ("deepseek-v3-small", 1, False),  # K=4 of E=32: 28 experts get no token (decode path)
    ("deepseek-v3-small", 3, False),
    ("gpt-oss-small", 2, False),
    ("tiny", 5, True),  # every token to the same K experts: the rest are empty (decode path)
    ("tiny", 129, True),  # ... prefill path
    ("latent-small", 200, True),
])
def test_experts_without_tokens(name, T, hot, artifact):
    spec = load_spec(SPECS / f"{name}.yaml")
    weights = random_weights(spec, 5)
    x, logits = inputs(spec, T, seed=100 + T)
    if hot:  # experts 0..K-1 win for every token (the small noise keeps their order tie-free)
        logits[:, :spec.top_k] += 20
    ids, _ = route_ref(logits, spec.router, spec.top_k, weights.get("e_score_correction_bias"))
    used = ids.unique().numel()
    assert used < spec.num_experts, "precondition: some experts must get no token"
    if hot:
        assert used == spec.top_k
    runner = MoERunner.load(artifact(name), weights)
    check_against_ref(spec, runner(x, logits), moe_ref(spec, weights, x, logits), T,
                      f"{name} T={T} ({spec.num_experts - used} of {spec.num_experts} experts empty)")


def test_chunking_above_max_chunk_tokens(tmp_path):
    from moegen.build import build

    spec = parse_spec({"name": "chunked", "dtype": "float32", "hidden_size": 64, "intermediate_size": 32,
                       "num_experts": 8, "top_k": 2, "shared_experts": {"intermediate_size": 32},
                       "max_chunk_tokens": 64})
    root = build(spec, DEFAULT_TARGET, tmp_path, golden=False)
    weights = random_weights(spec, 4)
    runner = MoERunner.load(root, weights)
    calls = spy_kernels(runner)
    step = spec.max_chunk_tokens
    for T in (64, 65, 200, 1000):
        calls.clear()
        x, logits = inputs(spec, T, seed=T)
        check_against_ref(spec, runner(x, logits), moe_ref(spec, weights, x, logits), T, f"chunked T={T}")
        chunks = [shape[0] for name, shape in calls if name == "routing"]  # logits [t, E] of each chunk
        assert len(chunks) == math.ceil(T / step), (T, chunks)
        assert sum(chunks) == T and max(chunks) <= step, (T, chunks)


def test_padded_layer_reads_x_to_the_reduction_step_only(tmp_path):
    """hidden 100 padded to 256: the up GEMMs take x [T, 128] (Hr rounded up to spec.X_STEP, not Hp),
    the runner pads x that far only, and the layer still equals the reference, with its output [T, 100]."""
    from moegen.build import build

    spec = parse_spec({"name": "padded-x", "dtype": "bfloat16", "hidden_size": 100, "intermediate_size": 48,
                       "num_experts": 6, "top_k": 2, "activation": "swigluoai", "expert_bias": True,
                       "padding": {"hidden_multiple": 256}})
    assert (spec.kernel_hidden, spec.kernel_x_width) == (256, 128)
    root = build(spec, DEFAULT_TARGET, tmp_path, golden=False)
    m = json.loads((root / MANIFEST).read_text())
    ups = [f for f in m["functions"] if f.startswith("experts_up_")]
    assert ups and all(m["functions"][f][0]["shape"][1] == "128" for f in ups)
    weights = random_weights(spec, 3)
    runner = MoERunner.load(root, weights)
    calls = spy_kernels(runner)
    for T in (1, 9, 70):
        calls.clear()
        x, logits = inputs(spec, T, seed=T)
        check_against_ref(spec, runner(x, logits), moe_ref(spec, weights, x, logits), T, f"padded T={T}")
        assert [shape for name, shape in calls if name.startswith("experts_up_")] == [(T, 128)], calls


def test_misaligned_hidden_states_reach_the_kernels_aligned(tiny_runner):
    """hidden_states that start 2 bytes into a buffer (a legal contiguous view) reach the up GEMMs as a
    16-byte aligned copy (CUDA kernels load x 16 bytes at a time), with the same result as aligned input."""
    from moegen.runtime.runner import INPUT_ALIGN_BYTES

    spec, runner = tiny_runner
    T, H = 5, spec.hidden_size
    buf = torch.randn(T * H + 1).to(torch.bfloat16)
    x = buf[1:].view(T, H)
    assert x.is_contiguous() and x.data_ptr() % INPUT_ALIGN_BYTES
    logits = torch.randn(T, spec.num_experts)
    seen = []
    originals = runner.__dict__.setdefault("_unspied_fns", runner._fns)

    def up(fn):
        def call(*args):
            seen.append(args[0].data_ptr() % INPUT_ALIGN_BYTES)
            return fn(*args)
        return call

    runner._fns = {n: up(f) if n.startswith("experts_up_") else f for n, f in originals.items()}
    try:
        out = runner(x, logits)
    finally:
        runner._fns = originals
    assert seen == [0]
    assert torch.equal(out, runner(x.clone(), logits))


# ---- runner input errors ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_runner(artifact):
    spec = load_spec(SPECS / "tiny.yaml")
    return spec, MoERunner.load(artifact("tiny"), random_weights(spec, 0))


def _bad_inputs(spec):
    H, E, T = spec.hidden_size, spec.num_experts, 4
    bf = torch.bfloat16
    ok_x, ok_l = torch.randn(T, H).to(bf), torch.randn(T, E)
    return {
        "hidden fp32": (torch.randn(T, H), ok_l, "hidden_states"),
        "hidden fp16": (torch.randn(T, H).half(), ok_l, "hidden_states"),
        "hidden int": (torch.ones(T, H, dtype=torch.int32), ok_l, "hidden_states"),
        "hidden 1-D": (torch.randn(H).to(bf), torch.randn(1, E), "hidden_states"),
        "hidden 3-D": (torch.randn(1, T, H).to(bf), ok_l, "hidden_states"),
        "hidden wrong H": (torch.randn(T, H + 1).to(bf), ok_l, "hidden_states"),
        "hidden list": (ok_x.tolist(), ok_l, "hidden_states"),
        "hidden numpy": (ok_x.float().numpy(), ok_l, "hidden_states"),
        "logits wrong E": (ok_x, torch.randn(T, E + 1), "router_logits"),
        "logits wrong T": (ok_x, torch.randn(T + 1, E), "router_logits"),
        "logits 1-D": (ok_x, torch.randn(T * E), "router_logits"),
        "logits transposed": (ok_x, torch.randn(E, T), "router_logits"),
        "logits int": (ok_x, torch.ones(T, E, dtype=torch.int64), "router_logits"),
        "logits list": (ok_x, ok_l.tolist(), "router_logits"),
        "logits None without gate": (ok_x, None, "router_logits"),
    }


def test_spy_sees_launches(tiny_runner):
    """The recorder the error tests rely on does see the five kernels of a good call."""
    spec, runner = tiny_runner
    calls = spy_kernels(runner)
    runner(torch.randn(3, spec.hidden_size).to(torch.bfloat16), torch.randn(3, spec.num_experts))
    assert [n.split("_")[0] for n, _ in calls] == ["routing", "dispatch", "experts", "experts", "combine"]


@pytest.mark.parametrize("case", list(_bad_inputs(load_spec(SPECS / "tiny.yaml"))))
def test_runner_input_errors(case, tiny_runner):
    spec, runner = tiny_runner
    x, logits, arg = _bad_inputs(spec)[case]
    calls = spy_kernels(runner)
    with pytest.raises(RunnerInputError) as e:
        runner(x, logits)
    msg = str(e.value)
    assert arg in msg, msg
    assert "\n" not in msg
    assert calls == [], f"kernels launched before the error: {calls}"


def _bad_weights(name):
    spec = load_spec(SPECS / f"{name}.yaml")
    w = random_weights(spec, 0)
    cases = {}

    def case(label, weight_name, mutate):
        d = dict(w)
        mutate(d)
        cases[f"{name}: {label}"] = (d, weight_name)

    case("missing w2", "w2", lambda d: d.pop("w2"))
    case("unknown w3", "w3", lambda d: d.__setitem__("w3", d["w2"].clone()))
    case("w13 wrong shape", "w13", lambda d: d.__setitem__("w13", d["w13"][:, :, :-1].clone()))
    case("w13 transposed", "w13", lambda d: d.__setitem__("w13", d["w13"].transpose(1, 2).contiguous()))
    case("w2 one expert short", "w2", lambda d: d.__setitem__("w2", d["w2"][1:].clone()))
    case("w2 fp32", "w2", lambda d: d.__setitem__("w2", d["w2"].float()))
    case("w13 not a tensor", "w13", lambda d: d.__setitem__("w13", d["w13"].float().numpy()))
    case("gate wrong shape", "gate", lambda d: d.__setitem__(
        "gate", torch.zeros(spec.num_experts + 1, spec.routed_width, dtype=torch.bfloat16)))
    case("gate_bias without gate", "gate_bias", lambda d: d.__setitem__(
        "gate_bias", torch.zeros(spec.num_experts, dtype=torch.bfloat16)))
    for extra in sorted(set(w) - {"w13", "w2"}):  # every spec-specific weight, missing
        case(f"missing {extra}", extra, lambda d, n=extra: d.pop(n))
    if "e_score_correction_bias" in w:
        case("correction bias bf16", "e_score_correction_bias", lambda d: d.__setitem__(
            "e_score_correction_bias", d["e_score_correction_bias"].to(torch.bfloat16)))
    if "shared_w13" in w:
        case("shared_w13 wrong shape", "shared_w13", lambda d: d.__setitem__("shared_w13", d["shared_w13"][1:]))
    return cases


WEIGHT_CASES = {k: v for n in SMALL_SPECS for k, v in _bad_weights(n).items()}


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_weights_errors_at_load(case, artifact):
    weights, weight_name = WEIGHT_CASES[case]
    with pytest.raises(RunnerInputError) as e:
        MoERunner.load(artifact(case.split(":")[0]), weights)
    msg = str(e.value)
    assert weight_name in msg and "weights" in msg, msg


def test_load_leaves_callers_weights_alone(artifact):
    spec = load_spec(SPECS / "gpt-oss-small.yaml")
    weights = random_weights(spec, 1)
    before = {k: v.clone() for k, v in weights.items()}
    runner = MoERunner.load(artifact("gpt-oss-small"), weights)
    x, logits = inputs(spec, 9, seed=1)
    runner(x, logits)
    assert set(weights) == set(before)
    for k, v in weights.items():
        assert torch.equal(v, before[k]), k


# ---- artifact errors -------------------------------------------------------------------------


def _replace(path: Path, data: bytes) -> None:
    """Write a new file in its place: the process still maps the loaded library's old inode, and
    rewriting that in place would crash the process (SIGSEGV at exit), not the code under test."""
    path.unlink()
    path.write_bytes(data)


def _flip_bytes(path: Path, at: float = 0.5, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    for j in range(i, i + n):
        data[j] ^= 0xFF
    _replace(path, bytes(data))


def _edit_manifest(root: Path, fn) -> None:
    m = json.loads((root / MANIFEST).read_text())
    fn(m)
    (root / MANIFEST).write_text(json.dumps(m, indent=1))


def _first_golden(root: Path) -> str:
    return sorted(p.relative_to(root).as_posix() for p in (root / "golden").rglob("*.pb"))[0]


def damage(case: str, root: Path) -> str:
    """Damage the artifact at `root` as `case` says; return the file the error message must name."""
    golden = _first_golden(root)
    if case == "moe.so bytes flipped":
        _flip_bytes(root / "moe.so")
        return "moe.so"
    if case == "moe.so one byte flipped near the end":
        _flip_bytes(root / "moe.so", at=0.97, n=1)
        return "moe.so"
    if case == "moe.so truncated":
        _replace(root / "moe.so", (root / "moe.so").read_bytes()[:4096])
        return "moe.so"
    if case == "runtime library flipped":
        _flip_bytes(root / "libtvm_runtime.so")
        return "libtvm_runtime.so"
    if case == "golden file edited":
        _flip_bytes(root / golden, at=0.9, n=2)
        return golden
    if case == "manifest invalid JSON":
        (root / MANIFEST).write_text((root / MANIFEST).read_text()[:-20])
        return MANIFEST
    if case == "manifest empty":
        (root / MANIFEST).write_text("")
        return MANIFEST
    if case == "manifest format_version changed":
        _edit_manifest(root, lambda m: m.update(format_version=m["format_version"] + 1))
        return MANIFEST
    if case == "manifest format_version removed":
        _edit_manifest(root, lambda m: m.pop("format_version"))
        return MANIFEST
    if case == "manifest hash of moe.so edited":
        _edit_manifest(root, lambda m: m["files"].update({"moe.so": "0" * 64}))
        return "moe.so"
    if case == "manifest hash of a golden file edited":
        _edit_manifest(root, lambda m: m["files"].update({golden: "f" * 64}))
        return golden
    if case == "moe.so missing":
        (root / "moe.so").unlink()
        return "moe.so"
    if case == "runtime library missing":
        (root / "libtvm_runtime.so").unlink()
        return "libtvm_runtime.so"
    if case == "golden file missing":
        (root / golden).unlink()
        return golden
    if case == "manifest missing":
        (root / MANIFEST).unlink()
        return MANIFEST
    raise AssertionError(case)


ARTIFACT_CASES = ["moe.so bytes flipped", "moe.so one byte flipped near the end", "moe.so truncated",
                  "runtime library flipped", "golden file edited", "manifest invalid JSON", "manifest empty",
                  "manifest format_version changed", "manifest format_version removed",
                  "manifest hash of moe.so edited", "manifest hash of a golden file edited", "moe.so missing",
                  "runtime library missing", "golden file missing", "manifest missing"]


@pytest.mark.parametrize("case", ARTIFACT_CASES)
def test_damaged_artifact_refused_at_load(case, artifact_copy):
    root = artifact_copy("tiny")
    spec = load_spec(SPECS / "tiny.yaml")
    weights = random_weights(spec, 0)
    MoERunner.load(root, weights)  # the copy is good before the damage
    named = damage(case, root)
    with pytest.raises(ArtifactError) as e:
        MoERunner.load(root, weights)
    msg = str(e.value)
    assert named in msg, msg
    assert str(root) in msg, msg


def test_copied_artifact_still_loads_after_move(artifact, tmp_path):
    """Hashes are of relative paths: an artifact moved elsewhere is the same artifact."""
    dst = tmp_path / "elsewhere" / "x"
    shutil.copytree(artifact("tiny"), dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    assert manifest["files"]["moe.so"] == sha256_file(dst / "moe.so")
    spec = load_spec(SPECS / "tiny.yaml")
    weights = random_weights(spec, 0)
    x, logits = inputs(spec, 17, seed=0)
    check_against_ref(spec, MoERunner.load(dst, weights)(x, logits), moe_ref(spec, weights, x, logits), 17, "moved")


def test_load_then_import_tvm_in_one_process(artifact, tmp_path):
    """Loading an artifact first and building afterwards (import tvm) must not load two TVM runtimes:
    that registers every global twice and aborts the process."""
    root = artifact("tiny")
    script = tmp_path / "child.py"
    script.write_text(f"""
import sys, torch
from moegen.runtime import MoERunner
from moegen.reference import random_weights
from moegen.spec import load_spec
assert "tvm" not in sys.modules
spec = load_spec({str(SPECS / 'tiny.yaml')!r})
runner = MoERunner.load({str(root)!r}, random_weights(spec, 0))
runner(torch.randn(3, spec.hidden_size).to(torch.bfloat16), torch.randn(3, spec.num_experts))
import tvm
print("OK", tvm.__version__)
""")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


# ---- weight packing at load -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt-oss-small", "latent-small"])
def test_runner_packs_with_the_artifacts_kernels(name, artifact, monkeypatch):
    """CPU artifacts carry pack_w13_n{BN} / pack_w2_n{BN} (schedules/cpu.yaml `pack:`) for each packed
    layout; the runner packs the weights with them, not with torch, and gets runtime/packing.py's tiles
    bit for bit: gpt-oss-small pads H 180 -> Hp 192 first and is gated, latent-small is relu2."""
    import torch.nn.functional as F

    from moegen.runtime import packing

    root = artifact(name)
    spec = load_spec(SPECS / f"{name}.yaml")
    m = json.loads((root / MANIFEST).read_text())
    layouts = {(p["config"]["block_n_up"], p["config"]["block_n_down"]) for p in m["paths"]}
    assert len(layouts) > 1  # the CPU schedules read two layouts: both packed
    assert {f for f in m["functions"] if f.startswith("pack_")} == \
        {f"pack_w13_n{u}" for u, _ in layouts} | {f"pack_w2_n{d}" for _, d in layouts}
    weights = random_weights(spec, 2)
    seen = []  # torch packing calls: only the biases' (a trailing axis of one, packing.pack_b13)
    torch_w13, torch_w2 = packing.pack_w13, packing.pack_w2
    monkeypatch.setattr(packing, "pack_w13", lambda w, *a: seen.append(tuple(w.shape)) or torch_w13(w, *a))
    monkeypatch.setattr(packing, "pack_w2", lambda w, *a: seen.append(tuple(w.shape)) or torch_w2(w, *a))
    runner = MoERunner.load(root, weights)
    monkeypatch.undo()
    assert all(s[-1] == 1 for s in seen), seen
    pad = spec.kernel_hidden - spec.routed_width
    w13, w2 = F.pad(weights["w13"], (0, pad)), F.pad(weights["w2"], (0, 0, 0, pad))
    assert set(runner._packed) == layouts
    for (up, down), (pw13, _, pw2, _) in runner._packed.items():
        assert torch.equal(pw13, packing.pack_w13(w13, up, spec.gated)), (up, down)
        assert torch.equal(pw2, packing.pack_w2(w2, down)), (up, down)


def test_artifact_without_pack_kernels_packs_with_torch(artifact, tmp_path):
    """An artifact from a schedule without `pack:` (and any artifact built before the pack kernels) has
    none: the runner packs with runtime/packing.py instead, and its outputs equal those of the runner
    that packed with the kernels exactly."""
    import re

    from moegen.build import build
    from moegen.schedule.config import schedule_file

    sched = tmp_path / "no-pack.yaml"
    text = schedule_file(DEFAULT_TARGET).read_text()
    sched.write_text(re.sub(r"(?m)^pack:.*\n", "", text))
    assert "pack:" in text and "pack:" not in sched.read_text()
    spec = load_spec(SPECS / "tiny.yaml")
    old = build(spec, DEFAULT_TARGET, tmp_path / "out", golden=False, schedules=sched)
    assert not [f for f in json.loads((old / MANIFEST).read_text())["functions"] if f.startswith("pack_")]
    weights = random_weights(spec, 5)
    with_torch, with_kernels = MoERunner.load(old, weights), MoERunner.load(artifact("tiny"), weights)
    for key, packed in with_kernels._packed.items():
        assert all(torch.equal(a, b) for a, b in zip(packed, with_torch._packed[key])), key
    for T in (1, 17, 129):
        x, logits = inputs(spec, T, seed=T)
        assert torch.equal(with_torch(x, logits), with_kernels(x, logits)), T
