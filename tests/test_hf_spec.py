"""`moegen spec from-hf`: the MoE layer of five model families from their config.json (values as the
public configs give them), and clear errors for the rest."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from moegen.cli import main
from moegen.integrations.hf import FAMILIES, spec_from_hf_config
from moegen.spec import SpecError, load_spec, parse_spec

CONFIGS = {
    "mixtral": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                    num_experts_per_tok=2, hidden_act="silu", torch_dtype="bfloat16"),
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=2048, moe_intermediate_size=1408, num_experts=60,
                      num_experts_per_tok=4, norm_topk_prob=False, shared_expert_intermediate_size=5632,
                      hidden_act="silu", torch_dtype="bfloat16"),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                      num_experts_per_tok=8, norm_topk_prob=True, hidden_act="silu", torch_dtype="bfloat16"),
    "deepseek_v3": dict(model_type="deepseek_v3", hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256,
                        num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                        scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, n_shared_experts=1,
                        hidden_act="silu", torch_dtype="bfloat16"),
    "gpt_oss": dict(model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_local_experts=32,
                    num_experts_per_tok=4, swiglu_limit=7.0, torch_dtype="bfloat16"),
}

EXPECTED = {  # field -> value, checked on the parsed spec
    "mixtral": dict(num_experts=8, top_k=2, intermediate_size=14336, activation="silu", shared_experts=None),
    "qwen2_moe": dict(num_experts=60, top_k=4, intermediate_size=1408, **{"router.renormalize": False,
                      "shared_experts.intermediate_size": 5632, "shared_experts.gate": "sigmoid"}),
    "qwen3_moe": dict(num_experts=128, top_k=8, intermediate_size=768, **{"router.renormalize": True}),
    "deepseek_v3": dict(num_experts=256, top_k=8, **{"router.scoring": "sigmoid", "router.num_expert_group": 8,
                        "router.topk_group": 4, "router.correction_bias": True, "router.routed_scaling_factor": 2.5,
                        "shared_experts.intermediate_size": 2048, "shared_experts.gate": "none"}),
    "gpt_oss": dict(num_experts=32, top_k=4, activation="swigluoai", expert_bias=True, swiglu_limit=7.0,
                    swiglu_alpha=1.702),
}


def _field(spec, dotted):
    obj = spec
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families(family):
    spec = parse_spec(spec_from_hf_config(CONFIGS[family]))
    assert spec.dtype == "bfloat16" and spec.hidden_size == CONFIGS[family]["hidden_size"]
    for dotted, want in EXPECTED[family].items():
        assert _field(spec, dotted) == want, dotted


def test_parallel_and_name():
    spec = parse_spec(spec_from_hf_config(CONFIGS["qwen3_moe"], tp=2, ep=4, name="q3"))
    assert (spec.name, spec.parallel.tp_size, spec.parallel.ep_size) == ("q3", 2, 4)
    with pytest.raises(SpecError, match="parallel.ep_size"):
        parse_spec(spec_from_hf_config(CONFIGS["mixtral"], ep=3))


def test_unsupported_type_names_the_supported_ones():
    with pytest.raises(SpecError) as e:
        spec_from_hf_config(dict(model_type="llama", hidden_size=4096))
    assert "config.model_type" in str(e.value) and all(f in str(e.value) for f in FAMILIES)


def test_missing_field_is_named():
    cfg = dict(CONFIGS["qwen3_moe"])
    del cfg["moe_intermediate_size"]
    with pytest.raises(SpecError, match="config.moe_intermediate_size"):
        spec_from_hf_config(cfg)


def test_cli_writes_a_buildable_spec(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(CONFIGS["deepseek_v3"]))
    out = tmp_path / "ds.yaml"
    res = CliRunner().invoke(main, ["spec", "from-hf", str(cfg), "--tp", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    spec = load_spec(out)
    assert spec.parallel.tp_size == 2 and spec.router.correction_bias
    assert yaml.safe_load(out.read_text())["name"] == "deepseek-v3-moe"


def test_cli_unsupported_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(dict(model_type="llama")))
    res = CliRunner().invoke(main, ["spec", "from-hf", str(cfg), "-o", str(tmp_path / "x.yaml")])
    assert res.exit_code == 2
    assert len(res.output.strip().splitlines()) == 1 and "mixtral" in res.output
    assert not (tmp_path / "x.yaml").exists()
