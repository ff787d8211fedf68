"""Hugging Face transformers and moegen: the spec of a model's MoE layer, and a loaded model whose MoE
blocks run on a moegen artifact.

Shape legend: T tokens (batch x sequence, flattened), E experts, K top-k, H hidden, I per-expert
intermediate, Is shared intermediate (all shared experts fused into one MLP).

    spec_from_hf_config(config.json dict) -> spec mapping (moegen.spec.parse_spec validates it)
    spec_for_model(model | config) -> the same, with the dtype of the loaded model's experts
    build_for_model(model | config, target, out_dir) -> artifact directory (needs apache-tvm: a build box)
    patch_model(model, artifact) -> the model, each MoE block replaced by a MoegenMoE (torch + tvm-ffi only)
    patch_block(block, config, artifact) -> one MoegenMoE (a single layer, e.g. a real-size check)

Supported model types are the keys of FAMILIES (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, gpt-oss), as
transformers 5.x defines their MoE blocks. Weights, transformers 5.x -> the weights contract (vLLM layout):

    experts.gate_up_proj [E, 2I, H], gate rows then up rows       -> w13 [E, 2I, H] as is
    experts.gate_up_proj [E, H, 2I], columns g0 u0 g1 u1 ... (gpt-oss: transposed, interleaved)
                                                                  -> w13 = [even columns; odd columns]^T
    experts.gate_up_proj_bias [E, 2I], interleaved (gpt-oss)      -> w13_bias [E, 2I] = [even; odd]
    experts.down_proj [E, H, I] (gpt-oss: [E, I, H])              -> w2 [E, H, I]
    experts.down_proj_bias [E, H] (gpt-oss)                       -> w2_bias [E, H]
    gate.e_score_correction_bias [E] (DeepSeek-V3)                -> e_score_correction_bias [E] fp32
    shared MLP gate_proj [Is, H], up_proj [Is, H], down_proj [H, Is] -> shared_w13 [2Is, H], shared_w2 [H, Is]
    shared_expert_gate.weight [1, H] (Qwen2-MoE)                  -> shared_gate [1, H]
    router gate.weight [E, H] (+ gpt-oss router.bias [E])         -> kept by MoegenMoE, which computes the
        logits [T, E] as the block did (model dtype; fp32 for DeepSeek-V3) and hands them to the runner.

gpt-oss's activation (gate clamped above, up clamped both ways, (up + 1) * gate * sigmoid(alpha * gate))
is moegen's swigluoai; DeepSeek-V3's router (sigmoid, correction bias to choose, grouped top-k on the sum
of each group's two best, renormalize, routed_scaling_factor) is the spec's router section.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from ..spec import MoESpec, SpecError, parse_spec, spec_from_dict, weights_contract


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
                num_experts=_get(cfg, "num_local_experts", "num_experts"), top_k=cfg["num_experts_per_tok"], activation=_act(cfg),
                router=dict(scoring="softmax", renormalize=True))


def _qwen2_moe(cfg: Mapping) -> dict:
    spec = dict(hidden_size=cfg["hidden_size"], intermediate_size=cfg["moe_intermediate_size"],
                num_experts=cfg["num_experts"], top_k=cfg["num_experts_per_tok"], activation=_act(cfg),
                router=dict(scoring="softmax", renormalize=bool(_get(cfg, "norm_topk_prob", default=False))))
    if _get(cfg, "shared_expert_intermediate_size", default=0):
        spec["shared_experts"] = dict(intermediate_size=cfg["shared_expert_intermediate_size"], gate="sigmoid")
    return spec


def _qwen3_moe(cfg: Mapping) -> dict:
    # config.json says num_experts; transformers 5's Qwen3MoeConfig.to_dict() says num_local_experts
    return dict(hidden_size=cfg["hidden_size"], intermediate_size=cfg["moe_intermediate_size"],
                num_experts=_get(cfg, "num_experts", "num_local_experts"), top_k=cfg["num_experts_per_tok"], activation=_act(cfg),
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
                num_experts=_get(cfg, "n_routed_experts", "num_local_experts"), top_k=cfg["num_experts_per_tok"],
                activation=_act(cfg), router=router)
    shared = _get(cfg, "n_shared_experts", default=0)
    if shared:  # the shared experts run as one MLP of their summed width
        spec["shared_experts"] = dict(intermediate_size=shared * cfg["moe_intermediate_size"], gate="none")
    return spec


def _gpt_oss(cfg: Mapping) -> dict:
    # gpt-oss: softmax over the K chosen logits (= softmax over all + renormalize), swiglu with
    # alpha 1.702 and a clamp, biases on both expert projections; the router's bias is a weight (gate_bias)
    return dict(hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
                num_experts=_get(cfg, "num_local_experts", "num_experts"),
                top_k=_get(cfg, "num_experts_per_tok", "experts_per_token"), activation="swigluoai",
                swiglu_alpha=float(_get(cfg, "swiglu_alpha", default=1.702)),
                swiglu_limit=float(_get(cfg, "swiglu_limit", default=7.0)),
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


# ---- a loaded transformers model -> a spec, an artifact, a patched model ------------------------------

class ModelMismatchError(ValueError):
    """An artifact (or a model) that patch_model cannot use: says which field differs and how, on one line."""


@dataclass(frozen=True)
class _Block:
    """Where a family's MoE block lives in transformers 5.x and what its forward does around the experts."""
    module: str  # python module of the block class
    cls: str  # the MoE block class (dense MLP layers of the same model are other classes: left alone)
    router: str  # attribute holding the router (weight [E, H], maybe bias [E], e_score_correction_bias [E])
    shared: str | None = None  # attribute of the shared MLP (gate_proj, up_proj, down_proj)
    shared_gate: str | None = None  # attribute of the shared MLP's sigmoid gate (Linear H -> 1)
    fp32_router: bool = False  # logits = x.float() @ W.float().T (DeepSeek-V3) instead of in the model dtype
    returns_scores: bool = False  # forward returns (hidden, router_scores [T, K]) (gpt-oss)

    def block_class(self) -> type:
        import importlib

        import transformers

        try:
            module = importlib.import_module(self.module)
        except ImportError as e:
            raise ModelMismatchError(f"transformers {transformers.__version__}: cannot import {self.module} ({e})") from e
        if not hasattr(module, self.cls):
            raise ModelMismatchError(f"transformers {transformers.__version__} has no {self.module}.{self.cls}; "
                                     "patch_model maps the MoE blocks of transformers 5.x")
        return getattr(module, self.cls)


BLOCKS: dict[str, _Block] = {
    "mixtral": _Block("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock", "gate"),
    "qwen2_moe": _Block("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock", "gate",
                        shared="shared_expert", shared_gate="shared_expert_gate"),
    "qwen3_moe": _Block("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock", "gate"),
    "deepseek_v3": _Block("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE", "gate",
                          shared="shared_experts", fp32_router=True),
    "gpt_oss": _Block("transformers.models.gpt_oss.modeling_gpt_oss", "GptOssMLP", "router", returns_scores=True),
}


def _config_dict(obj) -> dict:
    """A config.json dict from a model, a transformers config, a mapping or a path to a config.json."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, (str, Path)):
        with open(obj) as f:
            return json.load(f)
    cfg = getattr(obj, "config", obj)  # a model carries its config
    if not hasattr(cfg, "to_dict"):
        raise SpecError("config", type(obj).__name__, "a transformers model or config, a config.json dict or path")
    return cfg.to_dict()


def _moe_blocks(model, family: _Block) -> list[str]:
    cls = family.block_class()
    return [name for name, m in model.named_modules() if isinstance(m, cls)]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def spec_for_model(model_or_config, *, dtype: str | None = None, name: str | None = None, tp: int = 1,
                   ep: int = 1, **fields) -> dict:
    """The spec mapping of a model's MoE layer. A loaded model gives its experts' dtype (it may differ from
    config.dtype); `dtype` overrides it; `fields` set further spec fields (padding, max_chunk_tokens)."""
    cfg = _config_dict(model_or_config)
    spec = spec_from_hf_config(cfg, tp=tp, ep=ep, name=name)
    if dtype is None and isinstance(model_or_config, torch.nn.Module):
        names = _moe_blocks(model_or_config, BLOCKS[cfg["model_type"]])
        if names:
            dtype = _dtype_name(model_or_config.get_submodule(names[0]).experts.down_proj.dtype)
    if dtype is not None:
        spec["dtype"] = dtype
    spec.update(fields)
    return spec


def build_for_model(model_or_config, target: str, out_dir, *, golden: bool = True, **spec_args) -> Path:
    """Spec of the model's MoE layer (spec_for_model) -> artifact at out_dir/<name>/<target> (moegen.build).
    Needs apache-tvm (the build box); the returned directory is what patch_model takes."""
    from ..build import build

    return build(parse_spec(spec_for_model(model_or_config, **spec_args)), target, Path(out_dir), golden=golden)


# spec fields patch_model compares (name, padding, chunking and the parallel layout are the artifact's own)
_COMPARED = ("dtype", "hidden_size", "intermediate_size", "num_experts", "top_k", "activation", "expert_bias",
             "latent_size", "router.scoring", "router.renormalize", "router.num_expert_group", "router.topk_group",
             "router.correction_bias", "router.routed_scaling_factor", "router.apply_weight_on_input",
             "shared_experts.intermediate_size", "shared_experts.gate", "quant.scheme")


def _spec_fields(spec: MoESpec) -> dict[str, Any]:
    out = {}
    for dotted in _COMPARED + (("swiglu_alpha", "swiglu_limit") if spec.activation == "swigluoai" else ()):
        obj: Any = spec
        for part in dotted.split("."):
            obj = getattr(obj, part) if obj is not None else None
        out[dotted] = obj
    return out


def check_artifact_fits(spec: MoESpec, model_or_config, *, dtype: str | None = None,
                        where: str = "the artifact") -> None:
    """Raise ModelMismatchError naming every spec field where `spec` differs from the MoE layer of the model
    (or of the config, in `dtype`)."""
    want = parse_spec(spec_for_model(model_or_config, dtype=dtype))
    have, need = _spec_fields(spec), _spec_fields(want)
    diffs = [f"{k} is {have.get(k)!r} in the artifact, {need.get(k)!r} in the model"
             for k in sorted(set(have) | set(need)) if have.get(k) != need.get(k)]
    if diffs:
        what = (type(model_or_config).__name__ if isinstance(model_or_config, torch.nn.Module)
                else f"{_config_dict(model_or_config).get('model_type')} config")
        raise ModelMismatchError(f"{where} does not fit this {what}: " + "; ".join(diffs)
                                 + " (build one with moegen.integrations.hf.build_for_model)")


def _copy(t: torch.Tensor, device, dtype=None) -> torch.Tensor:
    """A new contiguous tensor (never a view of the model's parameter: the block must be freeable)."""
    return t.detach().to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def block_weights(block, family: _Block, spec: MoESpec, device=None) -> dict[str, torch.Tensor]:
    """The weights contract of one transformers MoE block: new tensors on `device` (default: the block's)."""
    ex = block.experts
    dev = device if device is not None else ex.down_proj.device
    gu, down = ex.gate_up_proj.detach(), ex.down_proj.detach()
    if getattr(ex, "is_transposed", False):  # stored [E, H, 2I] and [E, I, H]
        gu, down = gu.transpose(1, 2), down.transpose(1, 2)
    interleaved = not getattr(ex, "is_concatenated", True)  # g0 u0 g1 u1 ... along the 2I axis

    def gate_then_up(t: torch.Tensor) -> torch.Tensor:  # t [E, 2I, ...]: rows of gate, then rows of up
        return torch.cat([t[:, 0::2], t[:, 1::2]], 1).to(dev) if interleaved else _copy(t, dev)

    w = {"w13": gate_then_up(gu), "w2": _copy(down, dev)}
    if spec.expert_bias:
        w["w13_bias"] = gate_then_up(ex.gate_up_proj_bias.detach())
        w["w2_bias"] = _copy(ex.down_proj_bias, dev)
    router = getattr(block, family.router)
    if spec.router.correction_bias:
        w["e_score_correction_bias"] = _copy(router.e_score_correction_bias, dev, torch.float32)
    elif getattr(router, "e_score_correction_bias", None) is not None and router.e_score_correction_bias.any():
        raise ModelMismatchError("the model's router has a nonzero e_score_correction_bias; the spec has "
                                 "router.correction_bias false")
    if spec.shared_experts is not None:
        mlp = getattr(block, family.shared)
        w["shared_w13"] = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()]).to(dev)
        w["shared_w2"] = _copy(mlp.down_proj.weight, dev)
        if spec.shared_experts.gate == "sigmoid":
            w["shared_gate"] = _copy(getattr(block, family.shared_gate).weight, dev)
    contract = weights_contract(spec)
    for k, t in w.items():  # a layout this module misread says so here, before any kernel runs
        shape, dt = contract[k]
        if tuple(t.shape) != shape or _dtype_name(t.dtype) != dt:
            raise ModelMismatchError(f"{type(block).__name__}: weight {k} maps to {tuple(t.shape)} "
                                     f"{_dtype_name(t.dtype)}, the spec needs {shape} {dt}")
    return w


class MoegenMoE(torch.nn.Module):
    """A transformers MoE block run by a moegen MoERunner: the block's router (the logits computed as the
    block did), then the runner (routing, experts, shared experts); returns what the block returned.
    Inference only: the kernels have no backward."""

    def __init__(self, runner, family: _Block, router_weight: torch.Tensor, router_bias: torch.Tensor | None,
                 name: str = ""):
        super().__init__()
        self.runner, self.family, self.name = runner, family, name
        self.top_k = runner.spec.top_k
        self.register_buffer("router_weight", router_weight, persistent=False)  # [E, H]
        self.register_buffer("router_bias", router_bias, persistent=False)  # [E] or None

    @classmethod
    def from_block(cls, block, family: _Block, make_runner, device, name: str = "") -> "MoegenMoE":
        """make_runner(weights) -> MoERunner. Nothing of `block` is kept: the runner packs its own weights."""
        spec = make_runner.spec
        runner = make_runner(block_weights(block, family, spec, device))
        router = getattr(block, family.router)
        dt = torch.float32 if family.fp32_router else router.weight.dtype
        bias = getattr(router, "bias", None)
        return cls(runner, family, _copy(router.weight, device, dt),
                   _copy(bias, device) if isinstance(bias, torch.Tensor) else None, name)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> logits [T, E] as the block's router computes them (model dtype; fp32 for DeepSeek-V3)."""
        if self.family.fp32_router:
            return F.linear(x.float(), self.router_weight)
        return F.linear(x, self.router_weight, self.router_bias)

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        logits = self.router_logits(x)
        out = self.runner(x, logits)
        if isinstance(out, tuple):  # (shared [T, H], routed [T, H])
            shared, out = out
            out = out + shared
        out = out.view(shape)
        if self.family.returns_scores:  # gpt-oss: softmax over the K chosen logits, [T, K]
            top = torch.topk(logits, self.top_k, dim=-1).values
            return out, F.softmax(top, dim=1, dtype=top.dtype)
        return out

    def extra_repr(self) -> str:
        s = self.runner.spec
        return (f"{self.name or s.name}: E={s.num_experts} K={s.top_k} H={s.hidden_size} I={s.intermediate_size} "
                f"{s.dtype}, artifact={self.runner.root}, device={self.runner.device}")


def _runner_factory(artifact, device: torch.device, model_or_config, dtype: str, runner_kwargs: dict):
    """Load the artifact once (hashes, format, device: ArtifactError), check its spec against the model
    (ModelMismatchError), and return make_runner(weights) -> MoERunner, with the spec as .spec."""
    from ..runtime.loader import load_artifact
    from ..runtime.runner import MoERunner

    root = Path(artifact)
    manifest, module = load_artifact(root, device)
    spec = spec_from_dict(manifest["spec"])
    check_artifact_fits(spec, model_or_config, dtype=dtype, where=f"artifact {root}")

    def make_runner(weights):
        return MoERunner(root, manifest, module, weights, device, **runner_kwargs)

    make_runner.spec = spec
    return make_runner


def _device(device, block) -> torch.device:
    dev = torch.device(device) if device is not None else block.experts.down_proj.device
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():  # tensors say cuda:N
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _family(cfg: Mapping) -> _Block:
    spec_from_hf_config(cfg)  # an unsupported model_type: SpecError naming the supported ones
    return BLOCKS[cfg["model_type"]]


def patch_block(block, config, artifact, device=None, **runner_kwargs) -> MoegenMoE:
    """One transformers MoE block (of the family `config` describes) -> a MoegenMoE running `artifact`,
    with the same checks as patch_model. The block itself is not modified; drop it to free it. `device`
    (default: the block's) is where the runner and the replacement's router live: a block held on the
    CPU can be patched onto a GPU without holding the layer twice there."""
    cfg = _config_dict(config)
    family = _family(cfg)
    cls = family.block_class()
    if not isinstance(block, cls):
        raise ModelMismatchError(f"block: a {type(block).__name__}, a {cfg['model_type']} MoE block is a {cls.__name__}")
    dev = _device(device, block)
    make_runner = _runner_factory(artifact, dev, cfg, _dtype_name(block.experts.down_proj.dtype), runner_kwargs)
    return MoegenMoE.from_block(block, family, make_runner, dev)


def patch_model(model, artifact, device=None, **runner_kwargs):
    """Replace every MoE block of a loaded transformers model (FAMILIES) by a MoegenMoE running `artifact`.

    The artifact's spec must be the model's MoE layer (check_artifact_fits: ModelMismatchError names each
    differing field); `device` defaults to the blocks' device, and the artifact must be built for it
    (ArtifactError otherwise). Each block's weights are copied into the contract and packed by its runner;
    the original block is dropped, so its memory is freed once nothing else holds it. Dense MLP layers
    (DeepSeek-V3's first_k_dense_replace, Qwen's mlp_only_layers) are left alone. `runner_kwargs` go to
    MoERunner (tp_rank, ep_rank, reduce_results, process_group, shared_order). Patch after moving the model
    to its device and dtype: the runners do not follow a later model.to(). Returns the model.
    """
    cfg = _config_dict(model)
    family = _family(cfg)
    names = _moe_blocks(model, family)
    if not names:
        raise ModelMismatchError(f"{type(model).__name__} has no {family.cls} module: nothing to patch")
    first = model.get_submodule(names[0])
    dev = _device(device, first)
    make_runner = _runner_factory(artifact, dev, model, _dtype_name(first.experts.down_proj.dtype), runner_kwargs)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        new = MoegenMoE.from_block(getattr(parent, attr), family, make_runner, dev, name)
        setattr(parent, attr, new)  # the old block's last reference (unless the caller holds one)
    return model
