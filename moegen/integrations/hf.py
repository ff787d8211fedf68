"""Hugging Face model configs -> moegen specs (the MoE layer of a model).

Shape legend: E experts, K top-k, H hidden, I per-expert intermediate, Is shared intermediate.

`spec_from_hf_config(config)` reads a model's config.json (a dict) and returns the spec of its MoE
layer as a mapping that `moegen.spec.parse_spec` validates. Supported model types are the keys of
FAMILIES; weights mapping into a loaded transformers model (patch_model) is not written yet.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ..spec import SpecError


def _get(cfg: Mapping, *keys: str, default: Any = ...) -> Any:
    for k in keys:
        if k in cfg and cfg[k] is not None:
            return cfg[k]
    if default is ...:
        raise SpecError(f"config.{keys[0]}", None, f"present in a {cfg.get('model_type')} config.json")
    return default


def _act(cfg: Mapping) -> str:
    act = _get(cfg, "hidden_act", default="silu")
    mapped = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu2": "relu2"}.get(act)
    if mapped is None:
        raise SpecError("config.hidden_act", act, "silu | swish | gelu | relu2 for a gated MoE")
    return mapped


def _mixtral(cfg: Mapping) -> dict:
    return dict(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                num_experts=cfg["num_local_experts"], top_k=cfg["num_experts_per_tok"], activation=_act(cfg),
                router=dict(scoring="softmax", renormalize=True))


def _qwen2_moe(cfg: Mapping) -> dict:
    spec = dict(hidden_size=cfg["hidden_size"], intermediate_size=cfg["moe_intermediate_size"],
                num_experts=cfg["num_experts"], top_k=cfg["num_experts_per_tok"], activation=_act(cfg),
                router=dict(scoring="softmax", renormalize=bool(_get(cfg, "norm_topk_prob", default=False))))
    if _get(cfg, "shared_expert_intermediate_size", default=0):
        spec["shared_experts"] = dict(intermediate_size=cfg["shared_expert_intermediate_size"], gate="sigmoid")
    return spec


def _qwen3_moe(cfg: Mapping) -> dict:
    return dict(hidden_size=cfg["hidden_size"], intermediate_size=cfg["moe_intermediate_size"],
                num_experts=cfg["num_experts"], top_k=cfg["num_experts_per_tok"], activation=_act(cfg),
                router=dict(scoring="softmax", renormalize=bool(_get(cfg, "norm_topk_prob", default=True))))


def _deepseek_v3(cfg: Mapping) -> dict:
    scoring = _get(cfg, "scoring_func", default="sigmoid")
    router = dict(scoring=scoring, renormalize=bool(_get(cfg, "norm_topk_prob", default=True)),
                  routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", default=1.0)),
                  # noaux_tc: e_score_correction_bias picks experts, the unbiased scores weigh them
                  correction_bias=_get(cfg, "topk_method", default="noaux_tc") == "noaux_tc")
    groups = _get(cfg, "n_group", default=None)
    if groups and groups > 1:
        router.update(num_expert_group=groups, topk_group=cfg["topk_group"])
    spec = dict(hidden_size=cfg["hidden_size"], intermediate_size=cfg["moe_intermediate_size"],
                num_experts=cfg["n_routed_experts"], top_k=cfg["num_experts_per_tok"], activation=_act(cfg),
                router=router)
    shared = _get(cfg, "n_shared_experts", default=0)
    if shared:  # the shared experts run as one MLP of their summed width
        spec["shared_experts"] = dict(intermediate_size=shared * cfg["moe_intermediate_size"], gate="none")
    return spec


def _gpt_oss(cfg: Mapping) -> dict:
    # gpt-oss: softmax over the K chosen logits (= softmax over all + renormalize), swiglu with
    # alpha 1.702 and a clamp, biases on both expert projections; the router's bias is a weight (gate_bias)
    return dict(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                num_experts=cfg["num_local_experts"], top_k=_get(cfg, "num_experts_per_tok", "experts_per_token"),
                activation="swigluoai", swiglu_alpha=1.702, swiglu_limit=float(_get(cfg, "swiglu_limit", default=7.0)),
                expert_bias=True, router=dict(scoring="softmax", renormalize=True))


FAMILIES: dict[str, Callable[[Mapping], dict]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v3": _deepseek_v3,
    "gpt_oss": _gpt_oss,
}


def spec_from_hf_config(cfg: Mapping, *, tp: int = 1, ep: int = 1, name: str | None = None) -> dict:
    """The spec mapping of the MoE layer a config.json describes (validate with parse_spec)."""
    if not isinstance(cfg, Mapping):
        raise SpecError("config", type(cfg).__name__, "a JSON object (a Hugging Face config.json)")
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        raise SpecError("config.model_type", mt, " | ".join(FAMILIES) + " (MoE families moegen maps)")
    try:
        spec = FAMILIES[mt](cfg)
    except KeyError as e:
        raise SpecError(f"config.{e.args[0]}", None, f"present in a {mt} config.json") from None
    dtype = str(_get(cfg, "torch_dtype", "dtype", default="bfloat16")).removeprefix("torch.")
    spec.update(name=name or f"{mt.replace('_', '-')}-moe", dtype=dtype)
    if tp > 1 or ep > 1:
        spec["parallel"] = dict(tp_size=tp, ep_size=ep)
    return spec
