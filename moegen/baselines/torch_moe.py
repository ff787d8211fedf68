"""Plain-PyTorch MoE layers the GPU bench times moegen against, and the pieces every contender shares.

Shape legend: T tokens, K top-k, E experts, S = T*K routed slots (slot s = token s // K, its choice s % K),
H hidden, Hr routed width (L with a latent transform, else H), I intermediate per expert,
N13 = 2I (gated) | I rows of w13, Is shared intermediate.

Each contender is fn(x [T, H], logits [T, E] fp32) -> routed [T, Hr], or (shared [T, H], routed [T, Hr])
as MoERunner returns, computed in the spec dtype (bf16) with moegen.reference's semantics. Nothing in a
forward synchronises with the host, so a forward captures in a CUDA graph:
  - dense_loop_moe ("eager"): the per-expert loop a plain PyTorch layer can capture: every expert runs
    on every token (x @ w13[e]^T -> act -> @ w2[e]^T), times the token's routing weight for e (zero when
    e was not chosen), summed. No shape depends on the routing, so it is valid for any input; it pays
    E/K times the routed FLOPs and reads every expert.
  - EagerLoop ("eager_hf"): the per-expert loop of HF transformers (x_e @ w13[e]^T -> act -> @ w2[e]^T,
    weighted, index_add) on the hit experts only. HF reads the hit experts and their row counts on the
    host every forward (a sync); here that plan is read once per input before capture (`plan`), so the
    timed work is exactly HF's kernels without the sync, and a captured graph is valid for that routing only.
  - grouped_mm_moe: slots sorted by expert, torch._grouped_mm with offsets, activation, a second
    grouped mm, weighted scatter-add (the torchtitan / HF "grouped_mm" path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import activation_ref, route_ref
from ..spec import MoESpec


def route(spec: MoESpec, weights: dict[str, torch.Tensor], logits: torch.Tensor):
    """logits [T, E] -> (topk_ids [T, K] int32, topk_weights [T, K] fp32): torch's softmax/sigmoid + topk."""
    return route_ref(logits, spec.router, spec.top_k, weights.get("e_score_correction_bias"))


def routed_input(spec: MoESpec, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x [T, H] -> what the routed experts see [T, Hr] (the latent projection when the spec has one)."""
    return F.linear(x, weights["latent_proj"]) if spec.latent_size is not None else x


def act(spec: MoESpec, gu: torch.Tensor) -> torch.Tensor:
    return activation_ref(gu, spec.activation, spec.swiglu_alpha, spec.swiglu_limit)


def shared_mlp(spec: MoESpec, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The shared experts: a dense MLP in the model dtype, as MoERunner runs it. x [T, H] -> [T, H]."""
    y = F.linear(act(spec, F.linear(x, weights["shared_w13"])), weights["shared_w2"])
    if spec.shared_experts.gate == "sigmoid":
        y = y * torch.sigmoid(F.linear(x, weights["shared_gate"]))
    return y


def with_shared(spec: MoESpec, weights: dict[str, torch.Tensor], x: torch.Tensor, routed: torch.Tensor):
    """routed alone, or (shared, routed) when the spec has shared experts."""
    if spec.shared_experts is None:
        return routed
    return shared_mlp(spec, weights, x), routed


def sort_slots(topk_ids: torch.Tensor, num_experts: int):
    """topk_ids [T, K] -> (order [S] slots grouped by expert (stable), counts [E] int64, ends [E] int32
    cumulative row ends: torch._grouped_mm's offs)."""
    flat = topk_ids.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    order = torch.sort(flat, stable=True).indices
    return order, counts, torch.cumsum(counts, 0).to(torch.int32)


def dense_loop_moe(spec: MoESpec, weights: dict[str, torch.Tensor], x: torch.Tensor, logits: torch.Tensor):
    """Every expert on every token, weighted by the (mostly zero) dense routing weights [T, E]."""
    w, dt = weights, x.dtype
    xr = routed_input(spec, w, x)  # [T, Hr]
    ids, tw = route(spec, w, logits)
    T, E = x.shape[0], spec.num_experts
    dense_w = torch.zeros(T, E, dtype=dt, device=x.device).scatter_(1, ids.long(), tw.to(dt))  # [T, E]
    chosen = torch.zeros(T, E, dtype=dt, device=x.device).scatter_(1, ids.long(), 1.0)  # [T, E] 0/1
    out = torch.zeros(T, spec.routed_width, dtype=torch.float32, device=x.device)
    bias = spec.expert_bias
    for e in range(E):
        xe = xr * dense_w[:, e, None] if spec.router.apply_weight_on_input else xr
        gu = F.linear(xe, w["w13"][e], w["w13_bias"][e] if bias else None)  # [T, N13]
        y = F.linear(act(spec, gu), w["w2"][e], w["w2_bias"][e] if bias else None)  # [T, Hr]
        out += (y * (chosen if spec.router.apply_weight_on_input else dense_w)[:, e, None]).float()
    return with_shared(spec, w, x, out.to(dt))


class EagerLoop:
    """HF transformers' per-expert loop, made capturable: call plan(logits) once per input, then the
    forward loops over the experts that input hits with their row counts as host ints."""

    def __init__(self, spec: MoESpec, weights: dict[str, torch.Tensor]):
        self.spec, self.weights = spec, weights
        self.hits: list[tuple[int, int]] | None = None  # (expert, rows) in expert order

    def plan(self, logits: torch.Tensor) -> "EagerLoop":
        ids, _ = route(self.spec, self.weights, logits)
        counts = torch.bincount(ids.reshape(-1).long(), minlength=self.spec.num_experts).tolist()  # host sync
        self.hits = [(e, n) for e, n in enumerate(counts) if n]
        return self

    def __call__(self, x: torch.Tensor, logits: torch.Tensor):
        spec, w = self.spec, self.weights
        if self.hits is None:
            raise RuntimeError("EagerLoop: call plan(logits) before the forward")
        K, dt = spec.top_k, x.dtype
        xr = routed_input(spec, w, x)  # [T, Hr]
        ids, tw = route(spec, w, logits)
        order, _, _ = sort_slots(ids, spec.num_experts)
        tok = order // K  # [S] token of each sorted slot
        tws = tw.reshape(-1)[order].to(dt)  # [S]
        out = torch.zeros(x.shape[0], spec.routed_width, dtype=torch.float32, device=x.device)
        bias = spec.expert_bias
        start = 0
        for e, n in self.hits:
            t, we = tok[start:start + n], tws[start:start + n, None]  # [n], [n, 1]
            xe = xr[t] * we if spec.router.apply_weight_on_input else xr[t]
            gu = F.linear(xe, w["w13"][e], w["w13_bias"][e] if bias else None)  # [n, N13]
            y = F.linear(act(spec, gu), w["w2"][e], w["w2_bias"][e] if bias else None)  # [n, Hr]
            out.index_add_(0, t, (y if spec.router.apply_weight_on_input else y * we).float())
            start += n
        return with_shared(spec, w, x, out.to(dt))


def grouped_mm_moe(spec: MoESpec, weights: dict[str, torch.Tensor], x: torch.Tensor, logits: torch.Tensor):
    """torch._grouped_mm formulation (bf16 on sm90; row strides must be multiples of 16 bytes)."""
    w, K, dt = weights, spec.top_k, x.dtype
    xr = routed_input(spec, w, x)  # [T, Hr]
    ids, tw = route(spec, w, logits)
    order, _, offs = sort_slots(ids, spec.num_experts)
    tok = order // K  # [S]
    e_of_row = ids.reshape(-1).long()[order]  # [S] expert of each sorted row
    tws = tw.reshape(-1)[order].to(dt)[:, None]  # [S, 1]
    xs = xr[tok]  # [S, Hr]
    if spec.router.apply_weight_on_input:
        xs = xs * tws
    gu = torch._grouped_mm(xs, w["w13"].transpose(1, 2), offs=offs)  # [S, N13]
    if spec.expert_bias:
        gu = gu + w["w13_bias"][e_of_row]
    y = torch._grouped_mm(act(spec, gu), w["w2"].transpose(1, 2), offs=offs)  # [S, Hr]
    if spec.expert_bias:
        y = y + w["w2_bias"][e_of_row]
    if not spec.router.apply_weight_on_input:
        y = y * tws
    out = torch.zeros(x.shape[0], spec.routed_width, dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, y.float())
    return with_shared(spec, w, x, out.to(dt))


def triton_moe(spec: MoESpec, weights: dict[str, torch.Tensor], cfg):
    """The Triton fused-MoE contender for one config: torch routing + moegen.baselines.triton_moe."""
    from .triton_moe import fused_experts

    if spec.router.apply_weight_on_input:
        raise NotImplementedError("triton baseline: apply_weight_on_input is not implemented")
    w = weights

    def fn(x: torch.Tensor, logits: torch.Tensor):
        xr = routed_input(spec, w, x)
        ids, tw = route(spec, w, logits)
        routed = fused_experts(xr, w["w13"], w["w2"], ids, tw, spec.activation, cfg,
                               w13_bias=w.get("w13_bias"), w2_bias=w.get("w2_bias"),
                               alpha=spec.swiglu_alpha, limit=spec.swiglu_limit)
        return with_shared(spec, w, x, routed)

    return fn
