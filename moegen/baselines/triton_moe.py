"""A Triton fused-MoE baseline: vLLM's fused_moe algorithm, written for this project.

Shape legend: T tokens, K top-k, E experts, S = T*K routed slots (slot s = token s // K, its choice
s % K), H hidden (input and output width), I intermediate per expert, N13 = 2I (gated) | I rows of w13,
BM = BLOCK_M rows per block, MP rows of the padded sorted order, MB = MP / BM blocks.

Algorithm (routing itself is torch's topk/softmax, as in vLLM: moegen.reference.route_ref):
  1. align_block_size: the S slots sorted by expert (stable), each expert's run padded with the sentinel S
     to a multiple of BM, so that every block of BM sorted rows belongs to one expert: sorted_ids [MP],
     expert_ids [MB], num_rows_post_padded [1]. Pure torch and no host synchronisation: CUDA-graph capturable.
  2. GEMM 1 (moe_gemm_kernel): cache1[s] = x[s // K] @ w13[e]^T (+ w13_bias[e])         [S, N13]
  3. activation_kernel: cache2 = act(cache1) (silu, gelu, swigluoai: gate columns then up columns; relu2)
  4. GEMM 2 (moe_gemm_kernel): cache3[s] = (cache2[s] @ w2[e]^T (+ w2_bias[e])) * topk_weights[s]   [S, H]
  5. out = cache3.view(T, K, H).sum(1)

A config sweep (candidate_configs) picks BLOCK_M/N/K, GROUP_M, num_warps and num_stages per bucket of
rows per expert (T*K/E); the bench reports the best. Triton is imported only when a kernel launches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

ACTIVATION_CODES = {"silu": 0, "gelu": 1, "swigluoai": 2, "relu2": 3}  # _triton_kernels.ACT_*
ACT_BLOCK = 1024  # columns per program of the activation kernel


@dataclass(frozen=True)
class TritonConfig:
    block_m: int  # sorted rows per tile (>= 16: tl.dot's smallest M); also the alignment of each expert's run
    block_n: int  # output columns per tile
    block_k: int  # reduction step
    group_m: int  # row blocks that sweep the N tiles together (L2 reuse of A)
    num_warps: int
    num_stages: int  # software pipeline depth of the K loop

    @property
    def name(self) -> str:
        return (f"M{self.block_m}-N{self.block_n}-K{self.block_k}-G{self.group_m}"
                f"-w{self.num_warps}-s{self.num_stages}")

    def as_dict(self) -> dict:
        return asdict(self)


def _c(bm, bn, bk, gm, warps, stages) -> TritonConfig:
    return TritonConfig(bm, bn, bk, gm, warps, stages)


# The sweep: configs per bucket of R = T*K/E, the average number of rows each expert receives. Few rows
# (decode): one thin BM=16 block per expert, wide K steps to stream the weights; many rows: big tiles
# for tensor-core throughput. vLLM's untuned defaults are in each list (M16-N32-K64 for small batches,
# M64-N64-K32-G8 for large). Buckets share configs so a shape compiles each config once.
SMALL_ROWS = 4  # R <= SMALL_ROWS: "small"
MEDIUM_ROWS = 64  # SMALL_ROWS < R <= MEDIUM_ROWS: "medium"; above: "large"
CONFIG_BUCKETS: dict[str, list[TritonConfig]] = {
    "small": [_c(16, 32, 64, 1, 4, 4), _c(16, 64, 64, 1, 4, 4), _c(16, 64, 128, 1, 4, 3),
              _c(16, 128, 128, 1, 4, 3), _c(16, 32, 128, 1, 4, 4), _c(16, 64, 256, 1, 4, 3)],
    "medium": [_c(16, 64, 64, 1, 4, 4), _c(16, 128, 128, 1, 4, 3), _c(32, 64, 64, 8, 4, 4),
               _c(32, 128, 64, 8, 4, 3), _c(64, 64, 64, 8, 4, 4), _c(64, 128, 64, 8, 4, 3),
               _c(64, 64, 32, 8, 4, 4)],
    "large": [_c(64, 64, 32, 8, 4, 4), _c(64, 128, 64, 8, 4, 3), _c(64, 256, 64, 8, 8, 3),
              _c(128, 128, 64, 8, 8, 3), _c(128, 256, 64, 8, 8, 3), _c(128, 128, 32, 8, 4, 4)],
}


def config_bucket(num_tokens: int, top_k: int, num_experts: int) -> str:
    rows = num_tokens * top_k / num_experts
    return "small" if rows <= SMALL_ROWS else "medium" if rows <= MEDIUM_ROWS else "large"


def candidate_configs(num_tokens: int, top_k: int, num_experts: int, limit: int | None = None) -> list[TritonConfig]:
    """The configs to sweep for T tokens (the first `limit` of the bucket when given)."""
    configs = CONFIG_BUCKETS[config_bucket(num_tokens, top_k, num_experts)]
    return configs[:limit] if limit else list(configs)


# ---- 1. block alignment (pure torch) -------------------------------------------------------------


class Aligned(NamedTuple):
    sorted_ids: torch.Tensor  # [MP] int32: slot of each sorted row, S on padding
    expert_ids: torch.Tensor  # [MB] int32: expert of each block, -1 past the last used block
    num_rows_post_padded: torch.Tensor  # [1] int32: rows actually used (sum of padded runs)


def padded_rows(num_slots: int, num_experts: int, block_m: int) -> int:
    """MP: an upper bound of the padded sorted length known on the host (no synchronisation). At most
    min(E, S) experts receive slots, and each wastes fewer than BM rows; rounded up to whole blocks."""
    bound = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return -(-bound // block_m) * block_m


def align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Aligned:
    """topk_ids [T, K] -> the block-aligned sorted order (see Aligned). Within an expert, slots keep
    ascending order. Device-side only: sizes come from host ints, values never go to the host."""
    T, K = topk_ids.shape
    S, dev = T * K, topk_ids.device
    flat = topk_ids.reshape(-1).long()  # [S]
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    ends = torch.cumsum(padded, 0)  # padded end of each expert's run
    order = torch.sort(flat, stable=True).indices  # [S] slots grouped by expert
    sorted_e = flat[order]
    first = torch.cumsum(counts, 0) - counts  # unpadded start of each expert in `order`
    rank = torch.arange(S, device=dev) - first[sorted_e]  # position of the slot within its expert
    pos = ends[sorted_e] - padded[sorted_e] + rank  # row in the padded order
    MP = padded_rows(S, num_experts, block_m)
    sorted_ids = torch.full((MP,), S, dtype=torch.int32, device=dev)
    sorted_ids[pos] = order.to(torch.int32)
    block_start = torch.arange(MP // block_m, device=dev) * block_m
    expert_ids = torch.searchsorted(ends, block_start, right=True)  # first expert whose run ends past it
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    return Aligned(sorted_ids, expert_ids, ends[-1:].to(torch.int32))


def fused_experts_emulated(x, w13, w2, topk_ids, topk_weights, activation: str, block_m: int,
                           w13_bias=None, w2_bias=None, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """The kernels' data flow in plain torch (fp32), on align_block_size's output: what a test can check
    on a CPU. x [T, H], w13 [E, N13, H], w2 [E, H, I] -> [T, H]."""
    from ..reference import activation_ref

    T, K = topk_ids.shape
    S = T * K
    a = align_block_size(topk_ids, w13.shape[0], block_m)
    used = int(a.num_rows_post_padded)
    slot = a.sorted_ids[:used].long()
    real = slot < S
    e = a.expert_ids.long().repeat_interleave(block_m)[:used]
    cache1 = torch.zeros(S, w13.shape[1])
    rows = torch.einsum("rh,rnh->rn", x.float()[slot[real] // K], w13.float()[e[real]])
    if w13_bias is not None:
        rows = rows + w13_bias.float()[e[real]]
    cache1[slot[real]] = rows
    cache2 = activation_ref(cache1, activation, alpha, limit)  # [S, I]
    out = torch.einsum("ri,rhi->rh", cache2[slot[real]], w2.float()[e[real]])
    if w2_bias is not None:
        out = out + w2_bias.float()[e[real]]
    cache3 = torch.zeros(S, w2.shape[1])
    cache3[slot[real]] = out * topk_weights.reshape(-1).float()[slot[real], None]
    return cache3.view(T, K, -1).sum(1)


# ---- 2-5. the kernels ----------------------------------------------------------------------------


def _gemm(tk, a: torch.Tensor, w: torch.Tensor, bias, c: torch.Tensor, topk_weights: torch.Tensor,
          al: Aligned, a_div: int, mul_weight: bool, cfg: TritonConfig) -> None:
    import triton

    E, N, Kd = w.shape
    MP = al.sorted_ids.numel()
    grid = (triton.cdiv(MP, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    tk.moe_gemm_kernel[grid](
        a, w, bias if bias is not None else w, c, topk_weights, al.sorted_ids, al.expert_ids,
        al.num_rows_post_padded, N, Kd, MP, topk_weights.numel(),
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2),
        bias.stride(0) if bias is not None else 0, c.stride(0), c.stride(1),
        A_DIV=a_div, HAS_BIAS=bias is not None, MUL_WEIGHT=mul_weight,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, activation: str, cfg: TritonConfig, *, w13_bias=None, w2_bias=None,
                  alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """x [T, H] (bf16/fp16), w13 [E, N13, H], w2 [E, H, I], topk_ids [T, K], topk_weights [T, K] fp32
    -> [T, H] in x's dtype. Nothing synchronises with the host."""
    import triton

    from . import _triton_kernels as tk

    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation {activation!r}; allowed: {' | '.join(ACTIVATION_CODES)}")
    T, H = x.shape
    K = topk_ids.shape[1]
    S, N13, I = T * K, w13.shape[1], w2.shape[2]
    if S == 0:
        return x.new_zeros(T, H)
    x = x.contiguous()
    tw = topk_weights.to(torch.float32).reshape(-1).contiguous()  # [S]
    al = align_block_size(topk_ids, w13.shape[0], cfg.block_m)
    cache1 = torch.empty(S, N13, dtype=x.dtype, device=x.device)
    cache2 = torch.empty(S, I, dtype=x.dtype, device=x.device)
    cache3 = torch.empty(S, H, dtype=x.dtype, device=x.device)
    _gemm(tk, x, w13, w13_bias, cache1, tw, al, K, False, cfg)
    tk.activation_kernel[(S, triton.cdiv(I, ACT_BLOCK))](
        cache1, cache2, I, cache1.stride(0), cache2.stride(0), float(alpha), float(limit),
        ACT=ACTIVATION_CODES[activation], BLOCK=ACT_BLOCK)
    _gemm(tk, cache2, w2, w2_bias, cache3, tw, al, 1, True, cfg)
    return cache3.view(T, K, H).sum(1)
