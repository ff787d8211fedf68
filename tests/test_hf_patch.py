"""patch_model: transformers MoE models of the five families run on moegen CPU artifacts.

The models are built from small configs (scripts/hf_gpu_check.py's SMALL: irregular widths, few experts,
every structural feature of the family) with random weights and nonzero random biases; no weight and no
file is fetched from a hub (the network is blocked in every test). Checked: the model's logits, each MoE
block's output and greedy generation against the unpatched model, the refusals (another model's
artifact, an unsupported model type, the wrong device), that nothing of the original blocks stays
referenced, and the GPU script's CPU mode.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

from conftest import DEFAULT_TARGET, ROOT
from moegen.artifact import TOLERANCES, ArtifactError
from moegen.integrations.hf import (BLOCKS, FAMILIES, ModelMismatchError, MoegenMoE, build_for_model,
                                    check_artifact_fits, patch_model, spec_for_model)
from moegen.spec import SpecError, load_spec, parse_spec
from moegen.verify import rel_error

SCRIPT = ROOT / "scripts" / "hf_gpu_check.py"
_spec = importlib.util.spec_from_file_location("hf_gpu_check", SCRIPT)
gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu)  # its configs and model builders; main() is not run

FAMS = sorted(FAMILIES)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs offline: a connection attempt (a hub download included) raises."""
    def refuse(*args, **kwargs):
        raise RuntimeError("network access from a test (nothing may be downloaded)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def hf_artifact(artifact_root):
    """hf_artifact(family, dtype) -> CPU artifact of the small model's MoE layer, built once per session.
    bfloat16 ones carry the names scripts/specs/hf-*-small.yaml give them (the script's CPU mode finds them)."""
    cache = {}

    def get(family: str, dtype: str = "float32"):
        if (family, dtype) not in cache:
            name = gpu.spec_name(family, "small") + ("" if dtype == "bfloat16" else f"-{dtype}")
            cache[(family, dtype)] = build_for_model(gpu.hf_config(gpu.SMALL[family]), DEFAULT_TARGET, artifact_root,
                                                     dtype=dtype, name=name, golden=False)
        return cache[(family, dtype)]

    return get


def _moe_names(model, family):
    cls = BLOCKS[family].block_class()
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


def _capture_blocks(model, family, ids):
    """Run the model; return its logits and each MoE block's (input, output) of that run."""
    seen, hooks = {}, []
    for name in _moe_names(model, family):
        def hook(mod, args, out, name=name):
            out = tuple(o.detach().clone() for o in out) if isinstance(out, tuple) else out.detach().clone()
            seen[name] = (args[0].detach().clone(), out)
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        logits = model(ids).logits
    for h in hooks:
        h.remove()
    return logits, seen


def _untied(block: MoegenMoE, x: torch.Tensor) -> torch.Tensor:
    """[T] True for the tokens whose K-th and (K+1)-th router logits differ: a tie (bf16 logits now and
    then) may go to either expert, and torch.topk and moegen's routing break ties differently."""
    K = block.top_k
    top = block.router_logits(x.reshape(-1, x.shape[-1])).float().topk(K + 1).values
    return top[:, K - 1] != top[:, K]


def _ids(family, batch=2, length=13):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, gpu.SMALL[family]["vocab_size"], (batch, length), generator=g)


def _generate(model, ids, n=6):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


def _check_blocks(model, seen, tol):
    """Each patched block on the input its original saw: within tol of the original's output, and the MoE
    output is a large part of its input's norm (a wrong mapping could not hide in the residual)."""
    for name, (inp, want) in seen.items():
        block = model.get_submodule(name)
        assert isinstance(block, MoegenMoE), name
        with torch.no_grad():
            got = block(inp)
        if isinstance(want, tuple):  # gpt-oss: (hidden, router scores [T, K])
            assert isinstance(got, tuple) and len(got) == len(want), name
            assert rel_error(got[1], want[1]) <= tol, f"{name}: router scores"
            got, want = got[0], want[0]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        keep = _untied(block, inp)
        assert keep.sum() >= 0.9 * keep.numel(), f"{name}: too many routing ties for a meaningful check"
        flat_got, flat_want = got.reshape(-1, got.shape[-1])[keep], want.reshape(-1, want.shape[-1])[keep]
        assert rel_error(flat_got, flat_want) <= tol, f"{name}: {rel_error(flat_got, flat_want):.2e} > {tol}"
        assert want.float().norm() > 0.1 * inp.float().norm(), f"{name}: MoE output too small to test"


@pytest.mark.parametrize("family", FAMS)
def test_fp32_logits_blocks_and_greedy_tokens(family, hf_artifact):
    model = gpu.small_model(family, torch.float32, "cpu")
    ids = _ids(family)
    moe = _moe_names(model, family)
    others = {n: type(m) for n, m in model.named_modules() if n.endswith(".mlp") and n not in moe}
    ref, seen = _capture_blocks(model, family, ids)
    ref_tokens = _generate(model, ids[:1])
    assert set(seen) == set(moe) and moe

    assert patch_model(model, hf_artifact(family)) is model
    patched = [n for n, m in model.named_modules() if isinstance(m, MoegenMoE)]
    assert patched == moe  # every MoE block, and only those
    assert {n: type(model.get_submodule(n)) for n in others} == others  # dense layers left alone
    if family in ("deepseek_v3", "qwen2_moe"):
        assert others, "the config has a dense layer"
    tol = TOLERANCES["float32"]
    _check_blocks(model, seen, tol)
    with torch.no_grad():
        got = model(ids).logits
    assert rel_error(got, ref) <= tol, f"logits {rel_error(got, ref):.2e} > {tol}"
    assert _generate(model, ids[:1]).tolist() == ref_tokens.tolist()


@pytest.mark.parametrize("family", FAMS)
def test_bf16_logits_and_blocks(family, hf_artifact):
    model = gpu.small_model(family, torch.bfloat16, "cpu")
    ids = _ids(family)
    ref, seen = _capture_blocks(model, family, ids)
    patch_model(model, hf_artifact(family, "bfloat16"))
    tol = TOLERANCES["bfloat16"]
    _check_blocks(model, seen, tol)
    with torch.no_grad():
        got = model(ids).logits
    assert got.dtype == torch.bfloat16
    assert rel_error(got, ref) <= tol, f"logits {rel_error(got, ref):.2e} > {tol}"


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_original_blocks_are_released(family, hf_artifact):
    model = gpu.small_model(family, torch.float32, "cpu")
    with torch.no_grad():
        model(_ids(family))  # a forward first, as a user would have run
    old = [model.get_submodule(n) for n in _moe_names(model, family)]
    tensors = [t for b in old for t in list(b.parameters()) + list(b.buffers())]
    spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors]
    refs = [weakref.ref(b) for b in old] + [weakref.ref(t) for t in tensors]

    patch_model(model, hf_artifact(family))
    # while the old tensors are alive (their memory cannot be reused), nothing the model reaches shares it
    reached = list(_reachable_tensors(model))
    assert len(reached) > 10  # the walk sees the runners' packed weights too
    for t in reached:
        p = t.untyped_storage().data_ptr()
        assert not any(a <= p < a + n for a, n in spans), "a patched module shares storage with an old block"
    del old, tensors, t
    gc.collect()
    assert all(r() is None for r in refs), "something still holds the original MoE blocks"


def _reachable_tensors(model):
    """Every tensor held by the model's modules, including inside their plain attributes (the runner)."""
    seen = set()

    def walk(obj, depth):
        if id(obj) in seen or depth > 5:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from walk(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from walk(v, depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("moegen", "transformers", "torch.nn")):
            yield from walk(vars(obj), depth + 1)

    for m in model.modules():
        yield from walk(m, 0)


def test_refuses_another_models_artifact(hf_artifact):
    model = gpu.small_model("qwen3_moe", torch.float32, "cpu")
    with pytest.raises(ModelMismatchError) as e:
        patch_model(model, hf_artifact("mixtral"))
    msg = str(e.value)
    assert "\n" not in msg and "Qwen3MoeForCausalLM" in msg
    for part in ("hidden_size is 72 in the artifact, 80 in the model", "num_experts is 6 in the artifact, 10",
                 "top_k is 2 in the artifact, 4", "intermediate_size is 40 in the artifact, 48"):
        assert part in msg
    assert not any(isinstance(m, MoegenMoE) for m in model.modules())  # refused before touching the model

    with pytest.raises(ModelMismatchError) as e:  # the same layer in another dtype: only that is named
        patch_model(model, hf_artifact("qwen3_moe", "bfloat16"))
    assert "dtype is 'bfloat16' in the artifact, 'float32' in the model" in str(e.value)
    assert "hidden_size" not in str(e.value)

    ds = gpu.small_model("deepseek_v3", torch.float32, "cpu")
    ds.config.routed_scaling_factor = 1.0  # a router option differs
    with pytest.raises(ModelMismatchError, match=r"router.routed_scaling_factor is 2.5 in the artifact, 1.0 in the model"):
        patch_model(ds, hf_artifact("deepseek_v3"))


def test_refuses_an_unsupported_model_type(hf_artifact):
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                                         num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(SpecError) as e:
        patch_model(model, hf_artifact("mixtral"))
    assert "config.model_type" in str(e.value) and "'llama'" in str(e.value)
    assert all(f in str(e.value) for f in FAMILIES)


def test_refuses_a_cpu_artifact_for_another_device(hf_artifact):
    model = gpu.small_model("mixtral", torch.float32, "cpu")
    with pytest.raises(ArtifactError, match="runs on the CPU, not on cuda"):
        patch_model(model, hf_artifact("mixtral"), device="cuda")
    assert not any(isinstance(m, MoegenMoE) for m in model.modules())


def test_network_is_blocked_and_models_come_from_configs():
    with pytest.raises(RuntimeError, match="network access"):
        socket.create_connection(("127.0.0.1", 9))
    model = gpu.small_model("gpt_oss", torch.float32, "cpu")
    assert model.config._name_or_path == ""  # from a config, not a checkpoint


def test_spec_files_are_the_scripts_configs(tmp_path):
    """scripts/specs/hf-*.yaml (built by make gpu-bundle) are what hf_gpu_check.py's configs give."""
    for family in FAMS:
        for kind in ("small", "real"):
            path = ROOT / "scripts" / "specs" / f"{gpu.spec_name(family, kind)}.yaml"
            spec = load_spec(path)
            assert spec.hash == parse_spec(gpu.spec_of(family, kind)).hash, f"{path.name}: run --write-specs"
            cfg = gpu.hf_config((gpu.SMALL if kind == "small" else gpu.REAL)[family])
            check_artifact_fits(spec, cfg, dtype="bfloat16")
    # a config.json as published (Qwen3 says num_experts) gives the spec transformers' config object gives
    cfg = {k: v for k, v in gpu.SMALL["qwen3_moe"].items()}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert spec_for_model(tmp_path / "config.json") == spec_for_model(gpu.hf_config(cfg))


# As conftest's NO_TVM_PRELUDE, except that find_spec("tvm") answers a spec that cannot load instead of
# raising: transformers imports torch._dynamo, which calls find_spec("tvm") and takes only a spec or None
# (None, as on a box without TVM, would let the installed tvm be found by the next finder).
NO_TVM_FOR_TRANSFORMERS = textwrap.dedent(r'''
    import importlib.abc
    import importlib.machinery
    import sys


    class Refuse(importlib.abc.Loader):
        def create_module(self, spec):
            raise ImportError(f"apache-tvm is not available in this process ({spec.name})")

        def exec_module(self, module):
            raise ImportError("apache-tvm is not available in this process")


    class NoApacheTVM(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "tvm" or fullname.startswith("tvm."):
                return importlib.machinery.ModuleSpec(fullname, Refuse())
            return None


    sys.meta_path.insert(0, NoApacheTVM())
    try:
        import tvm  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("CHILD ERROR: `import tvm` succeeded although it is blocked")
''')


def test_gpu_script_cpu_mode_without_tvm(hf_artifact, artifact_root):
    """scripts/hf_gpu_check.py on CPU artifacts of its small specs, in a process that cannot import tvm."""
    for family in FAMS:
        hf_artifact(family, "bfloat16")
    child = NO_TVM_FOR_TRANSFORMERS + textwrap.dedent(f'''
        import runpy
        assert "tvm" not in sys.modules
        sys.argv = ["hf_gpu_check.py", "--device", "cpu", "--artifacts", {str(artifact_root)!r},
                    "--target", {DEFAULT_TARGET!r}, "--new-tokens", "4"]
        try:
            runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
        finally:
            assert not any(m == "tvm" or m.startswith("tvm.") for m in sys.modules if sys.modules[m] is not None)
    ''')
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)))
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "ALL OK" in out and "ERROR" not in out
    for table in ("(a) small models", "(b) one small MoE layer", "(c) greedy generation"):
        assert table in out
    for family in FAMS:
        assert sum(line.startswith(family) for line in out.splitlines()) == 3, family
