"""config.y_model_dtype: the down GEMM stores its weighted rows (the scratch y that combine sums over
top-k) in the model dtype instead of fp32, as vLLM's fused MoE does. Checked on the CPU build against
the layer reference; the GPU schedules' variant on the H100 (scripts/gpu_check.py).

Shape legend: T tokens, K top-k, MP sorted rows, Hp padded hidden.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import DEFAULT_TARGET
from moegen import reference as R
from moegen.artifact import TOLERANCES, read_manifest
from moegen.runtime import MoERunner
from moegen.spec import parse_spec
from test_kernels import rel


def _schedule(y_model_dtype: bool) -> dict:
    cfg = {"block_n_up": 16, "block_n_down": 16, "combine_n": 16, "y_model_dtype": y_model_dtype}
    return {"paths": [
        {"name": "nosort", "max_rows_per_expert": 1.5,
         "experts": dict(cfg, block_m=1, grid_blocks=True, sort=False)},
        {"name": "sorted", "max_rows_per_expert": None, "experts": dict(cfg, block_m=4)},
    ]}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_model_dtype_scratch_matches_the_layer_reference(dtype, tmp_path):
    from moegen.build import build

    spec = parse_spec(dict(name=f"ydt-{dtype}", dtype=dtype, hidden_size=48, intermediate_size=32, num_experts=8,
                           top_k=3, activation="swigluoai", expert_bias=True))
    roots = {}
    for flag in (False, True):
        sched = tmp_path / f"s{flag}.yaml"
        sched.write_text(yaml.safe_dump(_schedule(flag), sort_keys=False))
        roots[flag] = build(spec, DEFAULT_TARGET, tmp_path / str(flag), golden=False, schedules=sched)
    args = {a["name"]: a for a in read_manifest(roots[True])["functions"]["combine_sorted"]}
    assert args["y"]["dtype"] == dtype
    weights = R.random_weights(spec, seed=4)
    half, full = MoERunner.load(roots[True], weights), MoERunner.load(roots[False], weights)
    gen = torch.Generator().manual_seed(2)
    for T in (1, 2, 37):
        x = torch.randn(T, spec.hidden_size, generator=gen).to(getattr(torch, dtype))
        logits = torch.randn(T, spec.num_experts, generator=gen)
        got = half(x, logits)
        assert rel(got, R.moe_ref(spec, weights, x, logits)) <= TOLERANCES[dtype], T
        # the scratch of the path that ran holds the model dtype; the fp32 build's, fp32
        name = "nosort" if T * spec.top_k / spec.num_experts <= 1.5 else "sorted"
        assert half._stage[name][1]["y"].dtype == getattr(torch, dtype)
        full(x, logits)
        assert full._stage[name][1]["y"].dtype == torch.float32
