"""Pure-PyTorch oracle of the whole MoE layer, and a `_ref` twin for every kernel family.

Shape legend: T tokens, E experts, El local experts, K top-k, H hidden, Hr routed width (L or H),
Hp padded hidden (kernel width), I intermediate (per rank), L latent, Is shared intermediate,
BM rows per block of the sorted order, MB = ceil(T*K / BM) + El blocks at most, MP = MB * BM rows.

Everything here computes in fp32 from the given inputs. The twins mirror the kernels' exact contracts
(buffers, sentinels, order), so tests can compare indices exactly and floats by tolerance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import MoESpec, RouterSpec

# ---- routing ---------------------------------------------------------------------------------


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim, largest first, the lower index first among equal
    values (the kernels' order: torch.topk leaves ties unordered)."""
    top = values.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return top.new_empty(top.shape).copy_(top)  # compact strides, even with no rows (kernels check them)


def route_ref(logits: torch.Tensor, router: RouterSpec, top_k: int,
              correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (topk_ids [T, K] int32 in descending choice order, topk_weights [T, K] fp32)."""
    logits = logits.float()
    T, E = logits.shape
    scores = torch.softmax(logits, dim=-1) if router.scoring == "softmax" else torch.sigmoid(logits)  # [T, E]
    choice = scores + correction_bias.float() if router.correction_bias else scores.clone()  # [T, E]
    if router.grouped:
        G, TG = router.num_expert_group, router.topk_group
        grouped = choice.view(T, G, E // G)  # [T, G, E/G]
        if router.correction_bias:  # DeepSeek-V3: a group's score is the sum of its top two
            gscore = grouped.topk(min(2, E // G), dim=-1).values.sum(-1)  # [T, G]
        else:
            gscore = grouped.max(dim=-1).values  # [T, G]
        keep = torch.zeros_like(gscore, dtype=torch.bool)
        keep.scatter_(1, _top(gscore, TG), True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
    ids = _top(choice, top_k)  # [T, K]
    w = scores.gather(1, ids)  # weights always come from the unbiased scores
    if router.renormalize:
        w = w / w.sum(-1, keepdim=True)
    w = w * router.routed_scaling_factor
    return ids.to(torch.int32), w


# ---- dispatch --------------------------------------------------------------------------------


def max_blocks(num_tokens: int, top_k: int, local_experts: int, block_m: int, sort: bool = True) -> int:
    """MB: the most blocks the sorted order can need (each expert wastes at most one partial block);
    without the sort, one block per slot."""
    if not sort:
        return num_tokens * top_k
    return -(-num_tokens * top_k // block_m) + local_experts


def tile_counts_size(num_tokens: int, top_k: int, local_experts: int, tile: int) -> int:
    """Elements of the multi-block dispatch's scratch (kernels.dispatch.dispatch_tiles_funcs):
    NT * El, NT = ceil(T * K / tile) tiles of slots."""
    return -(-num_tokens * top_k // tile) * local_experts


def tile_counts_ref(topk_ids: torch.Tensor, expert_map: torch.Tensor, local_experts: int,
                    tile: int) -> torch.Tensor:
    """What the multi-block dispatch leaves in its scratch: [NT * El] int32, entry t * El + e = the slots
    of local expert e in the tiles before tile t (tiles of `tile` consecutive slots)."""
    local = expert_map.long()[topk_ids.reshape(-1).long()]  # [S]
    n = -(-local.numel() // tile)
    per_tile = torch.zeros(n, local_experts, dtype=torch.int64)
    valid = local >= 0
    tiles = torch.arange(local.numel()) // tile
    per_tile.index_put_((tiles[valid], local[valid]), torch.ones_like(local[valid]), accumulate=True)
    return (per_tile.cumsum(0) - per_tile).reshape(-1).to(torch.int32)


def dispatch_ref(topk_ids: torch.Tensor, expert_map: torch.Tensor, local_experts: int,
                 block_m: int) -> dict[str, torch.Tensor]:
    """Group the T*K slots by local expert, each expert's rows padded to a multiple of BM.

    topk_ids [T, K] global ids; expert_map [E] global -> local id, or -1 for an expert another rank owns.
    Returns counts [El] int32, offsets [El+1] int64 (padded starts), sorted_ids [MP] int32 (slot t*K+k,
    or the sentinel T*K on padding), block_expert [MB] int32 (-1 past the last block), num_blocks [1]
    int32, slot_pos [T*K] int32 (row of each slot in the sorted order, -1 when not local).
    Within an expert, slots keep ascending order.
    """
    T, K = topk_ids.shape
    S = T * K
    MB = max_blocks(T, K, local_experts, block_m)
    local = expert_map.long()[topk_ids.reshape(-1).long()]  # [S]
    counts = torch.zeros(local_experts, dtype=torch.int64)
    valid = local >= 0
    counts.scatter_add_(0, local[valid], torch.ones_like(local[valid]))
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.zeros(local_experts + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(padded, 0)
    sorted_ids = torch.full((MB * block_m,), S, dtype=torch.int32)
    slot_pos = torch.full((S,), -1, dtype=torch.int32)
    block_expert = torch.full((MB,), -1, dtype=torch.int32)
    for e in range(local_experts):
        slots = torch.nonzero(local == e).flatten()  # ascending
        rows = offsets[e] + torch.arange(len(slots))
        sorted_ids[rows] = slots.to(torch.int32)
        slot_pos[slots] = rows.to(torch.int32)
        block_expert[offsets[e] // block_m: offsets[e + 1] // block_m] = e
    num_blocks = (offsets[-1:] // block_m).to(torch.int32)
    return dict(counts=counts.to(torch.int32), offsets=offsets, sorted_ids=sorted_ids,
                block_expert=block_expert, num_blocks=num_blocks, slot_pos=slot_pos)


def dispatch_unsorted_ref(topk_ids: torch.Tensor, expert_map: torch.Tensor) -> dict[str, torch.Tensor]:
    """The dispatch of a path without the sort (one row per block; kernels/routing.py route_dispatch):
    slot s = t*K + k is row s and block s. Returns sorted_ids [S] (s), block_expert [S] (the slot's
    local expert, -1 when another EP rank owns it), num_blocks [1] (S), slot_pos [S] (s, or -1 likewise).
    (MB = S blocks.)"""
    S = topk_ids.numel()
    local = expert_map.long()[topk_ids.reshape(-1).long()].to(torch.int32)
    s = torch.arange(S, dtype=torch.int32)
    return dict(sorted_ids=s, block_expert=local, num_blocks=torch.tensor([S], dtype=torch.int32),
                slot_pos=torch.where(local >= 0, s, -1).to(torch.int32))


# ---- experts ---------------------------------------------------------------------------------


def activation_ref(gu: torch.Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """gu [..., 2I] (gate then up) for gated activations, [..., I] for relu2 -> [..., I]."""
    if activation == "relu2":
        return torch.relu(gu) ** 2
    g, u = gu.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(g) * u
    if activation == "gelu":
        return F.gelu(g) * u
    if activation == "swigluoai":
        g = g.clamp(max=limit)
        u = u.clamp(-limit, limit)
        return (u + 1) * g * torch.sigmoid(alpha * g)
    raise ValueError(f"unknown activation {activation!r}")


def experts_up_ref(x: torch.Tensor, topk_weights: torch.Tensor, d: dict[str, torch.Tensor],
                   w13: torch.Tensor, w13_bias: torch.Tensor | None, block_m: int, activation: str,
                   alpha: float = 1.702, limit: float = 7.0, weight_on_input: bool = False) -> torch.Tensor:
    """x [T, Hp], w13 [El, 2I|I, Hp] -> act [MP, I] fp32; rows of padding (sentinel slots) are zero."""
    T, K = topk_weights.shape
    S = T * K
    sorted_ids = d["sorted_ids"].long()  # [MP]
    real = sorted_ids < S
    tok = torch.where(real, sorted_ids // K, 0)
    # with T == 0 every row is padding and there is no row of x to gather
    xs = x.float()[tok] if S else x.new_zeros(len(tok), x.shape[1], dtype=torch.float32)  # [MP, Hp]
    if weight_on_input and S:
        xs = xs * torch.where(real, topk_weights.reshape(-1).float()[sorted_ids.clamp(max=S - 1)], 0)[:, None]
    be = d["block_expert"].long().repeat_interleave(block_m).clamp(min=0)  # [MP]
    gu = torch.einsum("rh,rnh->rn", xs, w13.float()[be])
    if w13_bias is not None:
        gu = gu + w13_bias.float()[be]
    act = activation_ref(gu, activation, alpha, limit)
    return torch.where(real[:, None], act, 0)


def experts_down_ref(act: torch.Tensor, topk_weights: torch.Tensor, d: dict[str, torch.Tensor],
                     w2: torch.Tensor, w2_bias: torch.Tensor | None, block_m: int,
                     weight_on_input: bool = False) -> torch.Tensor:
    """act [MP, I], w2 [El, Hp, I] -> out [T, Hp] fp32: routing-weighted sum over the K slots."""
    T, K = topk_weights.shape
    be = d["block_expert"].long().repeat_interleave(block_m).clamp(min=0)  # [MP]
    y = torch.einsum("ri,rhi->rh", act.float(), w2.float()[be])  # [MP, Hp]
    if w2_bias is not None:
        y = y + w2_bias.float()[be]
    pos = d["slot_pos"].long()  # [T*K]
    ys = torch.where((pos >= 0)[:, None], y[pos.clamp(min=0)], 0)  # [T*K, Hp]
    if not weight_on_input:
        ys = ys * topk_weights.reshape(-1, 1).float()
    return ys.view(T, K, y.shape[1]).sum(1)  # not -1: ambiguous when T == 0


def experts_fused_ref(x: torch.Tensor, topk_weights: torch.Tensor, block_expert: torch.Tensor,
                      w13: torch.Tensor, w13_bias: torch.Tensor | None, w2: torch.Tensor,
                      w2_bias: torch.Tensor | None, activation: str, alpha: float = 1.702, limit: float = 7.0,
                      weight_on_input: bool = False, act_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fused decode kernel (kernels/experts_fused.py): x [T, Hx], topk_weights [T, K], block_expert [T*K]
    (slot s's local expert, -1 for another EP rank's: dispatch_unsorted_ref) -> out [T, Hp] fp32, the
    unsorted path's experts_up_ref -> experts_down_ref with the activation rounded to `act_dtype` (the model
    dtype, as the kernel rounds it)."""
    S = block_expert.numel()
    s = torch.arange(S, dtype=torch.int32)
    d = dict(sorted_ids=s, block_expert=block_expert.to(torch.int32),
             slot_pos=torch.where(block_expert >= 0, s, -1).to(torch.int32))
    act = experts_up_ref(x, topk_weights, d, w13, w13_bias, 1, activation, alpha, limit, weight_on_input)
    return experts_down_ref(act.to(act_dtype), topk_weights, d, w2, w2_bias, 1, weight_on_input)


# ---- the whole layer -------------------------------------------------------------------------


def expert_map_ref(spec: MoESpec, rank: int = 0) -> torch.Tensor:
    """[E] global expert -> local index on `rank` of the EP group, -1 where another rank owns it."""
    E, ep = spec.num_experts, spec.parallel.ep_size
    El = E // ep
    m = torch.full((E,), -1, dtype=torch.int32)
    for e in range(E):
        owner, local = (e // El, e % El) if spec.parallel.expert_placement == "linear" else (e % ep, e // ep)
        if owner == rank:
            m[e] = local
    return m


def mlp_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, activation: str,
            alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """A dense (shared-expert) MLP in fp32: x [T, H], w13 [2Is, H], w2 [H, Is] -> [T, H]."""
    return activation_ref(x.float() @ w13.float().T, activation, alpha, limit) @ w2.float().T


def moe_ref(spec: MoESpec, weights: dict[str, torch.Tensor], hidden_states: torch.Tensor,
            router_logits: torch.Tensor | None = None):
    """The whole layer, single rank, in fp32. Returns routed [T, Hr], or (shared [T, H], routed [T, Hr]).

    Semantics follow vLLM's MoERunnerBase: routed-input transform, padding to Hp (zeros, so it changes
    nothing numerically here), gate when `weights` holds one, routing, experts, shared experts, truncation.
    """
    x = hidden_states.float()  # [T, H]
    xr = x  # [T, Hr]
    if spec.latent_size is not None:
        # The routed-input transform is a linear layer of the model: its output (what the gate and the
        # routed experts see) is a tensor of the model's dtype, as in vLLM.
        xr = (x @ weights["latent_proj"].float().T).to(hidden_states.dtype).float()
    if "gate" in weights:
        router_logits = xr @ weights["gate"].float().T
        if "gate_bias" in weights:
            router_logits = router_logits + weights["gate_bias"].float()
    if router_logits is None:
        raise ValueError("router_logits is required when the weights hold no 'gate'")
    ids, w = route_ref(router_logits, spec.router, spec.top_k, weights.get("e_score_correction_bias"))
    T, K = ids.shape
    routed = torch.zeros(T, spec.routed_width, device=x.device)
    for k in range(K):
        for e in ids[:, k].unique().tolist():
            rows = torch.nonzero(ids[:, k] == e).flatten()
            wk = w[rows, k, None]
            xin = xr[rows] * wk if spec.router.apply_weight_on_input else xr[rows]
            gu = xin @ weights["w13"][e].float().T
            if spec.expert_bias:
                gu = gu + weights["w13_bias"][e].float()
            y = activation_ref(gu, spec.activation, spec.swiglu_alpha, spec.swiglu_limit) @ weights["w2"][e].float().T
            if spec.expert_bias:
                y = y + weights["w2_bias"][e].float()
            routed[rows] += y if spec.router.apply_weight_on_input else y * wk
    if spec.shared_experts is None:
        return routed
    shared = mlp_ref(x, weights["shared_w13"], weights["shared_w2"], spec.activation,
                     spec.swiglu_alpha, spec.swiglu_limit)
    if spec.shared_experts.gate == "sigmoid":
        shared = shared * torch.sigmoid(x @ weights["shared_gate"].float().T)
    return shared, routed


def random_weights(spec: MoESpec, seed: int = 0, *, gate: bool = False, scale: float = 1.0,
                   device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Random full (unsharded) weights under the contract, in spec.dtype, scaled so outputs stay O(1).
    `device`: where they are drawn (a GPU draws a real-size layer in milliseconds; other values than
    the CPU's for the same seed)."""
    from .spec import OPTIONAL_WEIGHTS, weights_contract

    g = torch.Generator(device).manual_seed(seed)
    contract = dict(weights_contract(spec))
    if gate:
        contract["gate"] = OPTIONAL_WEIGHTS["gate"](spec)
    out = {}
    for name, (shape, dtype) in contract.items():
        fan_in = shape[-1] if len(shape) > 1 else 1
        t = torch.randn(*shape, generator=g, device=device) * (scale / fan_in ** 0.5 if len(shape) > 1 else 0.1)
        out[name] = t.to(getattr(torch, dtype))
    return out
