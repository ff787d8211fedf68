"""Triton kernels of the fused-MoE baseline (moegen.baselines.triton_moe). Imports triton: load it only
on a GPU box, through triton_moe.fused_experts.

Shape legend: T tokens, K top-k, E experts, S = T*K routed slots (slot s = token s // K, choice s % K),
H hidden, I intermediate per expert, N13 = 2I (gated) | I rows of w13, MP rows of the padded sorted
order (a multiple of BLOCK_M), MB = MP / BLOCK_M blocks (each block belongs to one expert).

moe_gemm_kernel: one program per (BLOCK_M sorted rows, BLOCK_N output columns) tile; row r of the sorted
order is slot sorted_ids[r] (or the sentinel S on padding), block r // BLOCK_M multiplies by the weight
of expert expert_ids[r // BLOCK_M]. A row reads A[slot // A_DIV] (A_DIV = K for x [T, H], 1 for the
per-slot activations [S, I]) and writes C[slot]. fp32 accumulation on tensor cores (tl.dot), then
+ bias[e], then (second GEMM) x topk_weights[slot].
"""

import triton
import triton.language as tl

INV_SQRT2 = tl.constexpr(0.7071067811865476)  # exact (erf) GELU: 0.5 g (1 + erf(g / sqrt 2))

# activation codes (triton_moe.ACTIVATION_CODES)
ACT_SILU = tl.constexpr(0)
ACT_GELU = tl.constexpr(1)
ACT_SWIGLUOAI = tl.constexpr(2)
ACT_RELU2 = tl.constexpr(3)


@triton.jit(do_not_specialize=["num_rows", "num_slots"])  # both change with T: no recompiling per T
def moe_gemm_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr,
                    num_rows_post_padded_ptr, N, K, num_rows, num_slots,
                    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_bias_e,
                    stride_cm, stride_cn,
                    A_DIV: tl.constexpr, HAS_BIAS: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[slot, n] = (A[slot // A_DIV, :] . B[e, n, :] + bias[e, n]) (* topk_weights[slot]) for the
    sorted rows of one tile. B is [E, N, K] (vLLM layout: out features, then in features)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row blocks sweep the N tiles together (reuse of A tiles in L2)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    if pid_m * BLOCK_M >= tl.load(num_rows_post_padded_ptr):
        return  # past the last expert's padded rows: the grid is sized for the worst case
    offs_row = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ids_ptr + offs_row).to(tl.int64)  # [BLOCK_M]
    slot_mask = slot < num_slots  # padding rows hold the sentinel S
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)

    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # wrapped: loads in bounds, stores masked
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (slot[:, None] // A_DIV) * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + e * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=slot_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e * stride_bias_e + offs_n).to(tl.float32)[None, :]
    if MUL_WEIGHT:
        acc *= tl.load(topk_weights_ptr + slot, mask=slot_mask, other=0.0)[:, None]
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + slot[:, None] * stride_cm + offs_cn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=slot_mask[:, None] & (offs_cn[None, :] < N))


@triton.jit
def activation_kernel(in_ptr, out_ptr, width, stride_in, stride_out, alpha, limit,
                      ACT: tl.constexpr, BLOCK: tl.constexpr):
    """One row, BLOCK columns: in [S, 2I] (gate columns then up columns) or [S, I] (relu2) -> out [S, I],
    computed in fp32 with moegen.reference.activation_ref's semantics."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    src = in_ptr + row * stride_in + cols
    if ACT == ACT_RELU2:
        v = tl.maximum(tl.load(src, mask=mask, other=0.0).to(tl.float32), 0.0)
        y = v * v
    else:
        g = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(src + width, mask=mask, other=0.0).to(tl.float32)
        if ACT == ACT_SILU:
            y = g * tl.sigmoid(g) * u
        elif ACT == ACT_GELU:
            y = 0.5 * g * (1.0 + tl.math.erf(g * INV_SQRT2)) * u
        else:  # swigluoai: clamped gate and up, (up + 1) * gate * sigmoid(alpha * gate)
            g = tl.minimum(g, limit)
            u = tl.minimum(tl.maximum(u, -limit), limit)
            y = (u + 1.0) * g * tl.sigmoid(alpha * g)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
