"""Hugging Face transformers models on moegen artifacts, on a GPU box without TVM (run from the repo root):

    pip install --no-deps --target /tmp/site gpu-bundle/whl/*.whl gpu-bundle/whl-hf/*.whl
    PYTHONPATH=/tmp/site:. python3 scripts/hf_gpu_check.py

(a) small models of the five families (the deterministic configs SMALL below, random weights, bf16):
    logits of the model patched with moegen vs unpatched, relative error against the dtype's tolerance;
(b) one real-size MoE layer per family (REAL below: Mixtral-8x7B, Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B,
    DeepSeek-V3, gpt-oss-20b), the transformers block with random weights vs moegen: max |err|, rel. error;
(c) greedy generation of the small models, batch 1: tokens/s with and without moegen, tokens that agree.

Artifacts: scripts/specs/hf-*.yaml, which `make gpu-bundle` builds into gpu-bundle/hf, under
$MOEGEN_GPU_ARTIFACTS (default gpu-bundle/hf)/<spec name>/<target>. `--write-specs` rewrites those spec files from SMALL and REAL
(build box). `--device cpu --target cpu-avx512 --artifacts DIR` runs the same checks on CPU artifacts of
the small specs, (b) on the small layers (tests/test_hf_patch.py does). Exit status 1 when a check fails.
Imports torch, transformers, moegen.runtime and moegen.integrations.hf (and moegen.verify's rel_error):
no apache-tvm.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from pathlib import Path

import torch

from moegen.artifact import TOLERANCES
from moegen.integrations.hf import BLOCKS, patch_block, patch_model, spec_for_model
from moegen.verify import rel_error

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "scripts" / "specs"
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss")

# Small models: 2-3 layers, irregular widths, few experts, every structural feature of the family
# (DeepSeek-V3: a dense first layer, grouped top-k, two shared experts; Qwen2-MoE: a dense layer and a
# gated shared expert). initializer_range 0.1 so that the MoE output is a large part of each layer's.
_COMMON = dict(vocab_size=97, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               initializer_range=0.1, tie_word_embeddings=False)
SMALL = {
    "mixtral": dict(_COMMON, model_type="mixtral", hidden_size=72, intermediate_size=40, num_local_experts=6,
                    num_experts_per_tok=2),
    "qwen2_moe": dict(_COMMON, model_type="qwen2_moe", hidden_size=72, intermediate_size=88, moe_intermediate_size=40,
                      shared_expert_intermediate_size=56, num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
                      mlp_only_layers=[0]),
    "qwen3_moe": dict(_COMMON, model_type="qwen3_moe", hidden_size=80, head_dim=20, intermediate_size=88,
                      moe_intermediate_size=48, num_experts=10, num_experts_per_tok=4, norm_topk_prob=True),
    "deepseek_v3": dict(_COMMON, model_type="deepseek_v3", num_hidden_layers=3, num_key_value_heads=4, hidden_size=96,
                        intermediate_size=88, moe_intermediate_size=40, n_routed_experts=12, n_group=4, topk_group=2,
                        num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
                        norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16,
                        v_head_dim=16),
    "gpt_oss": dict(_COMMON, model_type="gpt_oss", hidden_size=72, intermediate_size=40, num_local_experts=8,
                    num_experts_per_tok=2, head_dim=16, sliding_window=8, swiglu_limit=7.0),
}
# One real-size MoE layer per family (the public configs' MoE fields)
REAL = {
    "mixtral": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                    num_experts_per_tok=2),  # Mixtral-8x7B
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=2048, moe_intermediate_size=1408, num_experts=60,
                      num_experts_per_tok=4, shared_expert_intermediate_size=5632, norm_topk_prob=False),  # Qwen1.5-MoE-A2.7B
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                      num_experts_per_tok=8, norm_topk_prob=True),  # Qwen3-30B-A3B
    "deepseek_v3": dict(model_type="deepseek_v3", hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256,
                        num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
                        n_shared_experts=1),  # DeepSeek-V3 (671B)
    "gpt_oss": dict(model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_local_experts=32,
                    num_experts_per_tok=4, swiglu_limit=7.0),  # gpt-oss-20b
}
REAL_FIELDS = {"gpt_oss": dict(padding=dict(hidden_multiple=256))}  # as examples/specs/gpt-oss-20b.yaml
DTYPE = "bfloat16"
LAYER_TOKENS = (1, 33, 256)


def spec_name(family: str, kind: str) -> str:
    return f"hf-{family.replace('_', '-')}-{kind}"


def hf_config(d: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model(**d)


def spec_of(family: str, kind: str) -> dict:
    """The spec scripts/specs/<spec_name>.yaml holds (bf16)."""
    cfg = (SMALL if kind == "small" else REAL)[family]
    fields = REAL_FIELDS.get(family, {}) if kind == "real" else {}
    return spec_for_model(hf_config(cfg), dtype=DTYPE, name=spec_name(family, kind), **fields)


def write_specs() -> None:
    import yaml

    for family in FAMILIES:
        for kind in ("small", "real"):
            path = SPECS / f"{spec_name(family, kind)}.yaml"
            with open(path, "w") as f:
                f.write(f"# written by scripts/hf_gpu_check.py --write-specs: the {kind} {family} MoE layer "
                        "that the script checks\n")
                spec = spec_of(family, kind)
                head = {k: spec.pop(k) for k in ("name", "dtype")}
                yaml.safe_dump({**head, **spec}, f, sort_keys=False)
            print("wrote", path)


def randomize_moe_biases(model_or_block, seed: int) -> None:
    """Nonzero random biases where the MoE blocks have them (expert biases, router bias, DeepSeek's
    e_score_correction_bias): transformers initialises some to zero, and a mapping that drops one must fail."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model_or_block.named_parameters()) + list(model_or_block.named_buffers()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("gate_up_proj_bias", "down_proj_bias", "e_score_correction_bias") or \
                (leaf == "bias" and ".router." in f".{name}"):
            with torch.no_grad():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def small_model(family: str, dtype: torch.dtype, device, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(SMALL[family]), dtype=dtype)
    randomize_moe_biases(model, seed + 1)
    return model.to(device).eval()


def random_block(family: str, cfg_dict: dict, device, seed: int = 0):
    """The family's transformers MoE block for `cfg_dict`, made on `device` in bf16 (DeepSeek-V3's router
    in fp32, as transformers keeps it), weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1)."""
    cfg = hf_config(cfg_dict)
    cfg._experts_implementation = "eager"  # a block outside a model: transformers' reference loop
    cls = BLOCKS[family].block_class()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            block = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator(device=device).manual_seed(seed)
    H = cfg.hidden_size
    with torch.no_grad():
        for name, t in list(block.named_parameters()) + list(block.named_buffers()):
            if not t.is_floating_point():
                continue
            if t.dim() >= 2:
                fan_in = t.shape[-1]
                if name.endswith("experts.gate_up_proj"):
                    fan_in = H
                elif name.endswith("experts.down_proj"):
                    fan_in = t.shape[-2] if getattr(block.experts, "is_transposed", False) else t.shape[-1]
                t.normal_(0, 1 / math.sqrt(fan_in), generator=g)
            else:
                t.normal_(0, 0.1, generator=g)
    return block.eval(), cfg


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _tokens_per_s(model, ids, new: int, device) -> tuple[float, torch.Tensor]:
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **dict(kw, max_new_tokens=4, min_new_tokens=4))  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        _sync(device)
    return new / (time.perf_counter() - t0), out[0, ids.shape[1]:]


def artifact_dir(root: Path, name: str, target: str) -> Path:
    return root / name / target


def check_small(family: str, root: Path, target: str, device, new_tokens: int) -> tuple[dict, dict]:
    """(a) and (c) on one small model: logits and greedy generation, unpatched then patched."""
    dt = getattr(torch, DTYPE)
    model = small_model(family, dt, device)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, SMALL[family]["vocab_size"], (2, 13), generator=g).to(device)
    with torch.no_grad():
        ref = model(ids).logits
    tps_ref, gen_ref = _tokens_per_s(model, ids[:1], new_tokens, device)
    with torch.no_grad():  # the reference's logits at each step, to judge where a generation departs
        scores = model.generate(ids[:1], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=0, output_scores=True, return_dict_in_generate=True).scores
    patch_model(model, artifact_dir(root, spec_name(family, "small"), target))
    moe = sum(type(m).__name__ == "MoegenMoE" for m in model.modules())
    with torch.no_grad():
        got = model(ids).logits
    tps, gen = _tokens_per_s(model, ids[:1], new_tokens, device)
    err = rel_error(got, ref)
    same = int((gen == gen_ref).cumprod(0).sum())  # agreeing prefix
    # where moegen first picks another token, the reference's margin between its pick and moegen's (both
    # after the same prefix): a margin near the dtype's rounding is a near-tie, not a wrong layer
    gap = None
    if same < len(gen):
        step = scores[same][0].float()
        gap = (step[gen_ref[same]] - step[gen[same]]).item() / max(step.abs().max().item(), 1e-30)
    a = dict(layers=SMALL[family]["num_hidden_layers"], moe=moe, rel=err, maxabs=(got.float() - ref.float()).abs().max().item(),
             ok=err <= TOLERANCES[DTYPE] and moe > 0)
    c = dict(hf=tps_ref, moegen=tps, same=same, new=new_tokens, gap=gap)
    return a, c


def check_layer(family: str, kind: str, root: Path, target: str, device) -> list[dict]:
    """(b): the transformers MoE block with random weights vs the moegen replacement, for LAYER_TOKENS."""
    cfg_dict = (REAL if kind == "real" else SMALL)[family]
    block, cfg = random_block(family, cfg_dict, device)
    g = torch.Generator(device=device).manual_seed(11)
    xs = [torch.randn(1, T, cfg.hidden_size, generator=g, device=device, dtype=torch.bfloat16) for T in LAYER_TOKENS]
    with torch.no_grad():
        refs = [block(x) for x in xs]
    refs = [r[0] if isinstance(r, tuple) else r for r in refs]
    if torch.device(device).type == "cuda":  # hold the layer on the host while moegen packs its copy
        block = block.to("cpu")
        torch.cuda.empty_cache()
    new = patch_block(block, cfg, artifact_dir(root, spec_name(family, kind), target), device=device)
    del block
    gc.collect()
    rows = []
    K = new.top_k
    with torch.no_grad():
        for x, ref in zip(xs, refs):
            got = new(x)
            got = (got[0] if isinstance(got, tuple) else got)[0]
            # a token whose K-th and (K+1)-th logits are equal (bf16 logits tie now and then) may go to either
            # expert: transformers' torch.topk and moegen's routing break ties differently. Those are counted
            # and left out of the error; every other token must match.
            top = new.router_logits(x[0]).float().topk(min(K + 1, new.runner.spec.num_experts)).values
            keep = top[:, K - 1] != top[:, K] if top.shape[1] > K else torch.ones(len(top), dtype=torch.bool)
            keep = keep.to(got.device)
            err = rel_error(got[keep], ref[0][keep])
            rows.append(dict(T=x.shape[1], ties=int((~keep).sum()), rel=err, ok=err <= TOLERANCES[DTYPE],
                             maxabs=(got[keep].float() - ref[0][keep].float()).abs().max().item()))
    del new
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _shape(family: str, kind: str) -> str:
    s = spec_of(family, kind)
    return f"E={s['num_experts']} K={s['top_k']} H={s['hidden_size']} I={s['intermediate_size']}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--artifacts", default=os.environ.get("MOEGEN_GPU_ARTIFACTS", "gpu-bundle/hf"))
    ap.add_argument("--target", default=None, help="default: cuda-sm90 on a GPU, the cpu-* build on the CPU")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-real", action="store_true", help="(b) on the small layers instead of the real-size ones")
    ap.add_argument("--write-specs", action="store_true", help="rewrite scripts/specs/hf-*.yaml and exit")
    args = ap.parse_args(argv)
    if args.write_specs:
        write_specs()
        return 0
    import transformers

    device = torch.device(args.device)
    root = Path(args.artifacts)
    target = args.target
    if target is None:
        if device.type == "cuda":
            target = "cuda-sm90"
        else:
            found = sorted(p.name for p in (root / spec_name("mixtral", "small")).glob("cpu-*"))
            target = found[0] if found else "cpu-avx512"
    kind = "real" if device.type == "cuda" and not args.skip_real else "small"
    families = [f for f in args.families.split(",") if f]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name} | torch {torch.__version__} | transformers {transformers.__version__} | artifacts {root} ({target})",
          flush=True)
    ok = True
    small, layers = {}, {}
    for family in families:
        try:
            small[family] = check_small(family, root, target, device, args.new_tokens)
        except Exception as e:  # noqa: BLE001 - report and go on with the next family
            small[family] = f"{type(e).__name__}: {str(e)[:300]}"
        try:
            layers[family] = check_layer(family, kind, root, target, device)
        except Exception as e:  # noqa: BLE001
            layers[family] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"  {family} done", flush=True)

    tol = TOLERANCES[DTYPE]
    print(f"\n(a) small models, {DTYPE} logits, moegen-patched vs transformers (tolerance {tol:g})")
    print(f"{'family':<12} {'layers':>6} {'moe':>4} {'rel err':>10} {'max|err|':>10}  ok")
    for family in families:
        r = small[family]
        if isinstance(r, str):
            print(f"{family:<12} ERROR {r}")
            ok = False
            continue
        a = r[0]
        ok &= a["ok"]
        print(f"{family:<12} {a['layers']:>6} {a['moe']:>4} {a['rel']:>10.2e} {a['maxabs']:>10.2e}  {'ok' if a['ok'] else 'FAIL'}")

    print(f"\n(b) one {'real-size' if kind == 'real' else 'small'} MoE layer, random weights, {DTYPE}: moegen vs "
          f"the transformers block (tolerance {tol:g})")
    print(f"{'family':<12} {'shape':<30} {'T':>5} {'ties':>4} {'max|err|':>10} {'rel err':>10}  ok   "
          "(ties: tokens whose K-th and K+1-th logits are equal, left out)")
    for family in families:
        rows = layers[family]
        if isinstance(rows, str):
            print(f"{family:<12} ERROR {rows}")
            ok = False
            continue
        for i, r in enumerate(rows):
            ok &= r["ok"]
            shape = _shape(family, kind) if i == 0 else ""
            print(f"{family if i == 0 else '':<12} {shape:<30} {r['T']:>5} {r['ties']:>4} {r['maxabs']:>10.2e} {r['rel']:>10.2e}  "
                  f"{'ok' if r['ok'] else 'FAIL'}")

    print(f"\n(c) greedy generation of the small models, batch 1, {args.new_tokens} new tokens")
    print(f"{'family':<12} {'transformers tok/s':>18} {'moegen tok/s':>13} {'same tokens':>12}  "
          "(where they part: the reference's margin between the two picks / its largest |logit|)")
    for family in families:
        r = small[family]
        if isinstance(r, str):
            continue
        c = r[1]
        part = "" if c["gap"] is None else f"  margin {c['gap']:.1e}"
        print(f"{family:<12} {c['hf']:>18.1f} {c['moegen']:>13.1f} {c['same']:>9}/{c['new']}{part}")
    print("\nALL OK" if ok else "\nFAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
