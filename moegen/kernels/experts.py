"""Expert kernels: two grouped GEMMs over the block-aligned sorted order (compute only).
Twins: `moegen.reference.experts_up_ref` and `experts_down_ref`.

Shape legend: T tokens (symbolic), K top-k, S = T*K slots, El local experts, Hp padded hidden, Hx the
columns of x the up GEMM reads (Hp, or with padding the routed width rounded up), I intermediate per rank, N13 = 2I (gated) or I (relu2), BM rows per block, MB blocks at most
(ceil(S / BM) + El; S without the sort), MP = MB * BM sorted rows, BN columns per weight tile, NT tiles.

Weights arrive packed in column tiles (the runner packs once at load, see runtime/packing.py):
    w13p [El, NT13, Hp, BN]  tile t, column c: gated -> gate column t*BN/2 + c for c < BN/2, else up
                             column t*BN/2 + c - BN/2 (gate and up of one output column share a tile,
                             so the activation fuses); relu2 -> column t*BN + c
    w2p  [El, NT2, I, BN]    tile t, column c: hidden column t*BN + c
Biases are packed the same way ([El, NT, BN]). Iterating tile-major (tiles outer, blocks inner) keeps
one expert's weight tile hot in cache while every block of that expert reads it: weights cross memory
once per forward, whatever the token count.

experts_up:   act[r, :] = activation(x[token(r)] @ w13[e(r), :, :Hx].T + b13)         [MP, I]
              (x [T, Hx]: w13's columns past Hx are the padding's zeros)
experts_down: y[r, :]   = (act[r] @ w2[e(r)].T + b2) * weight(r)                       [MP, Hp] (scratch)
              out[t, :] = sum_k y[slot_pos[t*K + k], :]  (slots of other EP ranks add 0)  [T, Hp]
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T
from tvm.tirx import IntImm

from . import token_var


@dataclass(frozen=True)
class ExpertShapes:
    """Everything the expert kernels specialise on."""

    dtype: str
    local_experts: int  # El
    top_k: int  # K
    hidden: int  # Hp
    intermediate: int  # I (per rank)
    activation: str
    swiglu_alpha: float
    swiglu_limit: float
    expert_bias: bool
    weight_on_input: bool
    # Hx, the columns of x the up GEMMs read and reduce over (0: Hp). With hidden padding, Hr rounded up
    # to spec.X_STEP: w13's columns past Hr are zeros, so x needs no columns past Hx (MoESpec.kernel_x_width)
    x_width: int = 0

    @property
    def hx(self) -> int:
        return self.x_width or self.hidden

    @property
    def gated(self) -> bool:
        return self.activation != "relu2"

    @property
    def n13(self) -> int:
        return (2 if self.gated else 1) * self.intermediate


def _act(kind: str, g, u, alpha: float, limit: float):
    """The activation on fp32 values (u is ignored for relu2)."""
    if kind == "silu":
        return g * T.sigmoid(g) * u
    if kind == "gelu":
        return T.float32(0.5) * g * (T.float32(1) + T.erf(g * T.float32(0.7071067811865476))) * u
    if kind == "swigluoai":
        gc = T.min(g, T.float32(limit))
        uc = T.max(T.min(u, T.float32(limit)), T.float32(-limit))
        return (uc + T.float32(1)) * gc * T.sigmoid(T.float32(alpha) * gc)
    if kind == "relu2":
        return T.max(g, T.float32(0)) * T.max(g, T.float32(0))
    raise ValueError(kind)


def _max_blocks(n_slots, block_m, local_experts, unsorted: bool):
    """MB, the blocks of the sorted order at most: each expert pads at most one partial block; without
    the sort one block per slot (reference.max_blocks)."""
    return n_slots if unsorted else (n_slots + (block_m - 1)) // block_m + local_experts


def _expert(block_expert, vb, unsorted: bool):
    """The local expert of block vb, as an int64 index. Without the sort a block below num_blocks can
    belong to another EP rank (-1): clamped to expert 0, a harmless read whose rows no one combines
    (CUDA schedules skip such blocks altogether, schedule.cuda._exit_past_blocks)."""
    e = T.Cast("int64", block_expert[vb])
    return T.max(e, T.int64(0)) if unsorted else e


def _extent(n: int, wide: bool):
    """A loop extent: int64 when `wide`, else a Python int (int32 loops)."""
    return IntImm("int64", n) if wide else n


def experts_up_func(s: ExpertShapes, block_m: int, block_n: int, gather_rows: bool = True,
                    grid_blocks: bool = False, stage_operands: bool = False, int64_loops: bool = False,
                    unsorted: bool = False):
    """PrimFunc `experts_up(x [T, Hp], topk_weights [T, K] f32, sorted_ids [MP] i32, block_expert [MB] i32,
    num_blocks [1] i32, w13p [El, NT13, Hp, BN], b13p [El, NT13, BN], act [MP, I])`.

    gather_rows: stage each block's input rows in fp32 (stage "gather", a BM x Hp tile) before the GEMM;
    without it the GEMM reads x directly. A layout choice of the schedule (CPU: yes, GPU: no), made
    here because TVM cannot inline a stage across the data-dependent block loop.
    grid_blocks: loop over all MB possible blocks with a predicate (b < num_blocks) instead of exactly
    num_blocks: a static extent a GPU schedule can bind to the grid (blocks past the end exit at once).
    stage_operands: both GEMM operands through stages in the input dtype, indexed affinely by (block,
    tile): "gather" (rows, as gather_rows but not widened) and "load_w" (the block's expert's weight
    tile, ws[b, t] = w13[block_expert[b], t]). The GEMM is then a plain matmul of two staged buffers
    that a tensor-core schedule can place in shared memory and tensorize.
    int64_loops: loops and shapes in int64 like the token count (implied by stage_operands), and the
    fp32 sums per tile (gu[t, row, c]): TVM's region analysis cannot see through int32 -> int64 casts or
    solve one index for two loop variables, and compute_at / rfactor need it.
    unsorted (one row per block): the dispatch of a path without the sort, where a block below
    num_blocks can belong to another EP rank (block_expert -1): see _expert."""
    u_dt, u_El, u_K, u_H, u_I = s.dtype, s.local_experts, s.top_k, s.hidden, s.intermediate
    u_HX = s.hx  # x's columns, the reduction (w13 keeps its Hp rows per tile)
    u_BM, u_BN = block_m, block_n
    u_gated, u_woi, u_bias = s.gated, s.weight_on_input, s.expert_bias
    u_half = u_BN // 2 if u_gated else u_BN  # output columns per tile
    u_NT = s.n13 // u_BN
    u_act, u_alpha, u_limit = s.activation, s.swiglu_alpha, s.swiglu_limit
    u_gather = gather_rows or stage_operands
    u_one_row = block_m == 1  # row b of the sorted order, without a unit-loop term region analysis trips on
    # the fp32 sums gu[t, row, c] per tile t when int64_loops, else gu[0, row, t * BN + c]
    u_acc_tile, u_acc_stride = (1, 0) if int64_loops else (0, u_BN)
    u_acc_nt, u_acc_w = (u_NT, u_BN) if int64_loops else (1, u_NT * u_BN)
    u_xs_dt = u_dt if stage_operands else "float32"  # tensor cores take the input dtype
    # staged per (tile, block) for tensor cores: a stage pipeline, each thread block its own copy
    u_xs_nt = u_NT if stage_operands else 1
    u_xs_per_tile = 1 if stage_operands else 0
    u_copy_rows = stage_operands and not u_woi  # a plain row copy (asynchronous copies need one)
    # extents and shapes: int64 like the symbolic token count when staged (TVM's region analysis cannot see
    # through int32 -> int64 casts in the indices, and compute_at needs it)
    u_NT, u_BM, u_BN, u_H, u_HX, u_I, u_half, u_El, u_K, u_xs_nt, u_acc_nt, u_acc_w, u_acc_stride = (
        _extent(n, stage_operands or int64_loops)
        for n in (u_NT, u_BM, u_BN, u_H, u_HX, u_I, u_half, u_El, u_K, u_xs_nt, u_acc_nt, u_acc_w, u_acc_stride))
    tok = token_var()
    n_slots = tok * u_K
    n_blocks = _max_blocks(n_slots, u_BM, u_El, unsorted)

    @T.prim_func(s_tir=True)
    def experts_up(x_h: T.handle, tw_h: T.handle, sorted_h: T.handle, bexp_h: T.handle,
                   nblk_h: T.handle, w_h: T.handle, b_h: T.handle, act_h: T.handle):
        T.func_attr({"tir.noalias": True})
        x = T.match_buffer(x_h, (tok, u_HX), u_dt)
        topk_weights = T.match_buffer(tw_h, (tok, u_K), "float32")
        sorted_ids = T.match_buffer(sorted_h, (n_blocks * u_BM,), "int32")
        block_expert = T.match_buffer(bexp_h, (n_blocks,), "int32")
        num_blocks = T.match_buffer(nblk_h, (1,), "int32")
        w13 = T.match_buffer(w_h, (u_El, u_NT, u_H, u_BN), u_dt)
        b13 = T.match_buffer(b_h, (u_El, u_NT, u_BN), u_dt)
        act = T.match_buffer(act_h, (n_blocks * u_BM, u_I), u_dt)
        gu = T.sblock_alloc_buffer((u_acc_nt, n_blocks * u_BM, u_acc_w), "float32")
        xs = T.sblock_alloc_buffer((u_xs_nt, n_blocks * u_BM, u_HX), u_xs_dt)
        ws = T.sblock_alloc_buffer((n_blocks, u_NT, u_HX, u_BN), u_dt)
        for nt in range(u_NT):
            for b in range(n_blocks if grid_blocks else T.Cast("int64", num_blocks[0])):
                if stage_operands:
                    for h, c in T.grid(u_HX, u_BN):
                        with T.sblock("load_w"):
                            if grid_blocks:
                                T.where(b < T.Cast("int64", num_blocks[0]))
                            vt = T.axis.spatial(u_NT, nt)
                            vb = T.axis.spatial(n_blocks, b)
                            vh, vc = T.axis.remap("SS", [h, c])
                            ws[vb, vt, vh, vc] = w13[_expert(block_expert, vb, unsorted), vt, vh, vc]
                if u_gather:
                    # the block's input rows, gathered and in fp32 (scaled by the routing weight on input)
                    for m, h in T.grid(u_BM, u_HX):
                        with T.sblock("gather"):
                            if grid_blocks:
                                T.where(b < T.Cast("int64", num_blocks[0]))
                            vt = T.axis.spatial(u_NT, nt)
                            vb = T.axis.spatial(n_blocks, b)
                            vm, vh = T.axis.remap("SS", [m, h])
                            T.reads(x[0:tok, vh], sorted_ids[(vb if u_one_row else vb * u_BM + vm)], topk_weights[0:tok, 0:u_K])
                            T.writes(xs[vt * u_xs_per_tile, (vb if u_one_row else vb * u_BM + vm), vh])
                            xs[vt * u_xs_per_tile, (vb if u_one_row else vb * u_BM + vm), vh] = x[T.min(T.Cast("int64", sorted_ids[(vb if u_one_row else vb * u_BM + vm)]), n_slots - 1) // u_K, vh] if u_copy_rows else T.Cast(u_xs_dt, T.Cast("float32", x[T.min(T.Cast("int64", sorted_ids[(vb if u_one_row else vb * u_BM + vm)]), n_slots - 1) // u_K, vh]) * T.if_then_else(
                                u_woi, topk_weights[T.min(T.Cast("int64", sorted_ids[(vb if u_one_row else vb * u_BM + vm)]), n_slots - 1) // u_K,
                                                    T.min(T.Cast("int64", sorted_ids[(vb if u_one_row else vb * u_BM + vm)]), n_slots - 1) % u_K], T.float32(1)))
                for m, c, h in T.grid(u_BM, u_BN, u_HX):
                    with T.sblock("gemm"):
                        if grid_blocks:
                            T.where(b < T.Cast("int64", num_blocks[0]))
                        vt = T.axis.spatial(u_NT, nt)
                        vb = T.axis.spatial(n_blocks, b)
                        vm, vc, vh = T.axis.remap("SSR", [m, c, h])
                        with T.init():
                            gu[vt * u_acc_tile, (vb if u_one_row else vb * u_BM + vm), vt * u_acc_stride + vc] = T.float32(0)
                        gu[vt * u_acc_tile, (vb if u_one_row else vb * u_BM + vm), vt * u_acc_stride + vc] += (T.Cast("float32", xs[vt * u_xs_per_tile, (vb if u_one_row else vb * u_BM + vm), vh]) if u_gather else (
                            T.Cast("float32", x[T.min(T.Cast("int64", sorted_ids[(vb if u_one_row else vb * u_BM + vm)]), n_slots - 1) // u_K, vh])
                            * T.if_then_else(
                                u_woi, topk_weights[T.min(T.Cast("int64", sorted_ids[(vb if u_one_row else vb * u_BM + vm)]), n_slots - 1) // u_K,
                                                    T.min(T.Cast("int64", sorted_ids[(vb if u_one_row else vb * u_BM + vm)]), n_slots - 1) % u_K],
                                T.float32(1)))) * T.Cast("float32", ws[vb, vt, vh, vc] if stage_operands else
                                                         w13[_expert(block_expert, vb, unsorted), vt, vh, vc])
                for m, c in T.grid(u_BM, u_half):
                    with T.sblock("act"):
                        if grid_blocks:
                            T.where(b < T.Cast("int64", num_blocks[0]))
                        vt = T.axis.spatial(u_NT, nt)
                        vb = T.axis.spatial(n_blocks, b)
                        vm, vc = T.axis.remap("SS", [m, c])
                        if u_gated:
                            act[(vb if u_one_row else vb * u_BM + vm), vt * u_half + vc] = T.Cast(u_dt, _act(
                                u_act,
                                gu[vt * u_acc_tile, (vb if u_one_row else vb * u_BM + vm), vt * u_acc_stride + vc]
                                + T.if_then_else(u_bias, T.Cast("float32", b13[_expert(block_expert, vb, unsorted), vt, vc]), T.float32(0)),
                                gu[vt * u_acc_tile, (vb if u_one_row else vb * u_BM + vm), vt * u_acc_stride + u_half + vc]
                                + T.if_then_else(u_bias, T.Cast("float32", b13[_expert(block_expert, vb, unsorted), vt, u_half + vc]), T.float32(0)),
                                u_alpha, u_limit))
                        else:
                            act[(vb if u_one_row else vb * u_BM + vm), vt * u_half + vc] = T.Cast(u_dt, _act(
                                u_act,
                                gu[vt * u_acc_tile, (vb if u_one_row else vb * u_BM + vm), vt * u_acc_stride + vc]
                                + T.if_then_else(u_bias, T.Cast("float32", b13[_expert(block_expert, vb, unsorted), vt, vc]), T.float32(0)),
                                None, u_alpha, u_limit))

    return experts_up


def experts_down_func(s: ExpertShapes, block_m: int, block_n: int, grid_blocks: bool = False,
                      stage_operands: bool = False, int64_loops: bool = False, unsorted: bool = False,
                      y_dtype: str = "float32"):
    """PrimFunc `experts_down(act [MP, I], topk_weights [T, K] f32, sorted_ids [MP] i32, block_expert [MB] i32,
    num_blocks [1] i32, w2p [El, NT2, I, BN], b2p [El, NT2, BN], y [MP, Hp] y_dtype)`: weighted rows, sorted
    order, summed in fp32 and stored as y_dtype (fp32, or the model dtype: half the scratch bytes).
    grid_blocks, stage_operands, int64_loops, unsorted: as experts_up_func (act rows are already in block order:
    only the weight tile is staged; ysum is laid out as experts_up_func's gu)."""
    d_dt, d_El, d_K, d_H, d_I = s.dtype, s.local_experts, s.top_k, s.hidden, s.intermediate
    d_BM, d_BN = block_m, block_n
    d_NT = d_H // d_BN
    d_woi, d_bias = s.weight_on_input, s.expert_bias
    d_one_row = block_m == 1  # as experts_up_func
    d_acc_tile, d_acc_stride = (1, 0) if int64_loops else (0, d_BN)
    d_acc_nt, d_acc_w = (d_NT, d_BN) if int64_loops else (1, d_H)
    d_NT, d_BM, d_BN, d_H, d_I, d_El, d_K, d_acc_nt, d_acc_w, d_acc_stride = (
        _extent(n, stage_operands or int64_loops)
        for n in (d_NT, d_BM, d_BN, d_H, d_I, d_El, d_K, d_acc_nt, d_acc_w, d_acc_stride))
    tok = token_var()
    n_slots = tok * d_K
    n_blocks = _max_blocks(n_slots, d_BM, d_El, unsorted)

    @T.prim_func(s_tir=True)
    def experts_down(act_h: T.handle, tw_h: T.handle, sorted_h: T.handle, bexp_h: T.handle, nblk_h: T.handle,
                     w_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"tir.noalias": True})
        act = T.match_buffer(act_h, (n_blocks * d_BM, d_I), d_dt)
        topk_weights = T.match_buffer(tw_h, (tok, d_K), "float32")
        sorted_ids = T.match_buffer(sorted_h, (n_blocks * d_BM,), "int32")
        block_expert = T.match_buffer(bexp_h, (n_blocks,), "int32")
        num_blocks = T.match_buffer(nblk_h, (1,), "int32")
        w2 = T.match_buffer(w_h, (d_El, d_NT, d_I, d_BN), d_dt)
        b2 = T.match_buffer(b_h, (d_El, d_NT, d_BN), d_dt)
        y = T.match_buffer(y_h, (n_blocks * d_BM, d_H), y_dtype)
        ysum = T.sblock_alloc_buffer((d_acc_nt, n_blocks * d_BM, d_acc_w), "float32")
        ws = T.sblock_alloc_buffer((n_blocks, d_NT, d_I, d_BN), d_dt)
        for nt in range(d_NT):
            for b in range(n_blocks if grid_blocks else T.Cast("int64", num_blocks[0])):
                if stage_operands:
                    for i, c in T.grid(d_I, d_BN):
                        with T.sblock("load_w"):
                            if grid_blocks:
                                T.where(b < T.Cast("int64", num_blocks[0]))
                            vt = T.axis.spatial(d_NT, nt)
                            vb = T.axis.spatial(n_blocks, b)
                            vi, vc = T.axis.remap("SS", [i, c])
                            ws[vb, vt, vi, vc] = w2[_expert(block_expert, vb, unsorted), vt, vi, vc]
                for m, c, i in T.grid(d_BM, d_BN, d_I):
                    with T.sblock("gemm"):
                        if grid_blocks:
                            T.where(b < T.Cast("int64", num_blocks[0]))
                        vt = T.axis.spatial(d_NT, nt)
                        vb = T.axis.spatial(n_blocks, b)
                        vm, vc, vi = T.axis.remap("SSR", [m, c, i])
                        with T.init():
                            ysum[vt * d_acc_tile, (vb if d_one_row else vb * d_BM + vm), vt * d_acc_stride + vc] = T.float32(0)
                        ysum[vt * d_acc_tile, (vb if d_one_row else vb * d_BM + vm), vt * d_acc_stride + vc] += (
                            T.Cast("float32", act[(vb if d_one_row else vb * d_BM + vm), vi])
                            * T.Cast("float32", ws[vb, vt, vi, vc] if stage_operands else
                                     w2[_expert(block_expert, vb, unsorted), vt, vi, vc]))
                for m, c in T.grid(d_BM, d_BN):
                    with T.sblock("scale"):
                        if grid_blocks:
                            T.where(b < T.Cast("int64", num_blocks[0]))
                        vt = T.axis.spatial(d_NT, nt)
                        vb = T.axis.spatial(n_blocks, b)
                        vm, vc = T.axis.remap("SS", [m, c])
                        y[(vb if d_one_row else vb * d_BM + vm), vt * d_BN + vc] = T.Cast(y_dtype, (
                            ysum[vt * d_acc_tile, (vb if d_one_row else vb * d_BM + vm), vt * d_acc_stride + vc]
                            + T.if_then_else(d_bias, T.Cast("float32", b2[_expert(block_expert, vb, unsorted), vt, vc]), T.float32(0))
                        ) * T.if_then_else(
                            d_woi, T.float32(1),
                            topk_weights[T.min(T.Cast("int64", sorted_ids[(vb if d_one_row else vb * d_BM + vm)]), n_slots - 1) // d_K,
                                         T.min(T.Cast("int64", sorted_ids[(vb if d_one_row else vb * d_BM + vm)]), n_slots - 1) % d_K]))

    return experts_down


def combine_func(s: ExpertShapes, block_m: int, unsorted: bool = False, y_dtype: str = "float32"):
    """PrimFunc `combine(y [MP, Hp] y_dtype, slot_pos [T*K] i32, out [T, Hp])`: out[t] = sum over k (in fp32)
    of the row of slot t*K+k (0 for a slot another EP rank owns). A function of its own: every token needs
    every block of the down GEMM done (a grid-wide dependency on a GPU). unsorted: MP = S (_max_blocks)."""
    d_dt, d_El, d_K, d_H, d_BM = s.dtype, s.local_experts, s.top_k, s.hidden, block_m
    tok = token_var()
    n_slots = tok * d_K
    n_blocks = _max_blocks(n_slots, d_BM, d_El, unsorted)

    @T.prim_func(s_tir=True)
    def combine(y_h: T.handle, pos_h: T.handle, out_h: T.handle):
        T.func_attr({"tir.noalias": True})
        y = T.match_buffer(y_h, (n_blocks * d_BM, d_H), y_dtype)
        slot_pos = T.match_buffer(pos_h, (n_slots,), "int32")
        out = T.match_buffer(out_h, (tok, d_H), d_dt)
        osum = T.sblock_alloc_buffer((tok, d_H), "float32")
        for t, n, k in T.grid(tok, d_H, d_K):
            with T.sblock("combine"):
                vt, vn, vk = T.axis.remap("SSR", [t, n, k])
                with T.init():
                    osum[vt, vn] = T.float32(0)
                osum[vt, vn] += T.if_then_else(
                    slot_pos[vt * d_K + vk] >= 0,
                    T.Cast("float32", y[T.max(T.Cast("int64", slot_pos[vt * d_K + vk]), T.int64(0)), vn]), T.float32(0))
        for t, n in T.grid(tok, d_H):
            with T.sblock("store"):
                vt, vn = T.axis.remap("SS", [t, n])
                out[vt, vn] = T.Cast(d_dt, osum[vt, vn])


    return combine
