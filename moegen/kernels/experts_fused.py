"""The decode path's experts in one GPU kernel: up GEMV, activation, down GEMV and the sum over top-k.
Twin: `moegen.reference.experts_fused_ref` (experts_up_ref -> experts_down_ref, which sums over top-k, unsorted).

Shape legend: T tokens (symbolic), K top-k, S = T*K slots, El local experts, Hp padded hidden, Hx the
columns of x the up GEMV reads, I intermediate per rank, N13 = 2I (gated) or I (relu2), BNu / BNd the packed
tile widths of w13 / w2, NT13 = N13 / BNu, NT2 = Hp / BNd, HALF = the intermediates one w13 tile makes
(BNu / 2 gated, BNu relu2), V elements per 16-byte load, SK threads splitting the up GEMV's reduction,
NTH = SK * BNu / V threads a block, U 16-byte loads a thread has in flight, G = Hp / V column groups.

Weights arrive packed as for experts.py (w13p [El, NT13, Hp, BNu], w2p [El, NT2, I, BNd]): tile t of w13
makes intermediates t*HALF .. (t+1)*HALF, and those are rows t*HALF.. of every w2 tile, HALF * BNd
contiguous elements each. So thread block (t, s) owns the slot's intermediates of tile t end to end:
  1. up:   sums[c] = x[token(s), :Hx] @ w13p[e(s), t, :Hx, c]   (thread (ks, cg): rows ks*Hx/SK.., 16-byte
           loads of V columns; the SK partials meet in shared memory)
  2. act:  a[i] = activation(gate + b13, up + b13), rounded to the model dtype like the act buffer of the
           unfused path                                              [HALF]
  3. down: y[h] = (a @ w2p[e(s), h // BNd, t*HALF:(t+1)*HALF, h % BNd]) * weight(s) (+ b2 * weight(s) once,
           by tile 0)                                                [Hp], R threads per column group
  4. sum:  red.global.add of y into acc [T, Hp] fp32 (a persistent buffer the runner zeroes once)
  5. the last block to finish (a counter, after a memory fence) writes out = acc in the model dtype and
     zeroes acc and the counter for the next forward: no combine kernel, nothing left to clear.
A block of another EP rank's expert (block_expert -1) computes nothing but still counts.
The sum over slots and tiles is in fp32 in whatever order the blocks finish (not bitwise reproducible).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T

from . import token_var, vector_elems
from .experts import ExpertShapes, _act
from .routing import RankRouter, _rank_route

@dataclass(frozen=True)
class FusedTile:
    """What the fused decode kernel specialises on besides the layer shape."""

    block_n_up: int  # BNu: the packed w13 tile (one block's intermediates: BNu / 2 gated)
    block_n_down: int  # BNd: the packed w2 tile
    split_k: int  # SK threads splitting the up GEMV's reduction over Hx
    unroll: int  # U 16-byte weight loads in flight per thread and batch
    vector_red: bool  # red.global.add.v4.f32 (sm_90) instead of scalar atomicAdd
    prefetch: str = "none"  # the GEMVs that issue their next batch of loads before summing one: up | down | both
    # rows of a thread interleaved with its block's other threads (up: j, j + SK, ..., down: r, r + R, ...), so
    # each batch of a block's loads covers contiguous rows; false: each thread a contiguous range of rows
    interleave: bool = False


def tile_intermediates(s: ExpertShapes, block_n_up: int) -> int:
    """HALF, the intermediates one packed w13 tile makes (gated: half its columns are gate, half up)."""
    return block_n_up // 2 if s.gated else block_n_up


def fused_split(s: ExpertShapes, tile: FusedTile) -> tuple[int, int, int]:
    """(NTH threads, R threads per down column group, P passes over the column groups)."""
    v = vector_elems(s.dtype)
    nth = tile.split_k * tile.block_n_up // v
    groups = s.hidden // v
    half = tile_intermediates(s, tile.block_n_up)
    r = 1
    while r * 2 * groups <= nth and half % (r * 2 * tile.unroll) == 0:
        r *= 2
    per_pass = nth // r
    return nth, r, (groups + per_pass - 1) // per_pass


def fused_tile_ok(s: ExpertShapes, tile: FusedTile) -> str | None:
    """Why the fused kernel cannot take this layer with this tile (None: it can)."""
    v = vector_elems(s.dtype)
    half = tile_intermediates(s, tile.block_n_up)
    if tile.block_n_up % v or tile.block_n_down % v or s.n13 % tile.block_n_up or s.hidden % tile.block_n_down:
        return (f"block_n_up {tile.block_n_up} / block_n_down {tile.block_n_down} must be multiples of {v} "
                f"dividing N13 {s.n13} / Hp {s.hidden}")
    if s.hx % (tile.split_k * tile.unroll):
        return f"split_k {tile.split_k} x decode_unroll {tile.unroll} must divide Hx {s.hx}"
    if half % tile.unroll:
        return f"decode_unroll {tile.unroll} must divide the {half} intermediates of a w13 tile"
    nth = fused_split(s, tile)[0]
    if nth > 1024:
        return f"split_k {tile.split_k} x block_n_up {tile.block_n_up} / {v}: {nth} threads, more than 1024"
    if tile.block_n_up > nth:
        return f"block_n_up {tile.block_n_up} needs at least as many threads (split_k x block_n_up / {v}: {nth})"
    return None


def fused_routing_ok(s: ExpertShapes, tile: FusedTile, router: RankRouter) -> str | None:
    """Why the fused kernel cannot route this layer itself (a thread per expert), or None."""
    nth = fused_split(s, tile)[0]
    if router.TH > nth:
        return f"fused_routing: {router.E} experts need {router.TH} threads, the block has {nth}"
    return None


def experts_fused_func(s: ExpertShapes, tile: FusedTile, router: RankRouter | None = None):
    """PrimFunc `experts_fused(x [T, Hx], topk_weights [T, K] f32, block_expert [S] i32, w13p, b13p, w2p, b2p,
    acc [T, Hp] f32, count [1] i32, out [T, Hp])` (see the module docstring). acc and count are zero on
    entry and left zero on exit. With `router`, each block routes its token itself (no route_dispatch
    before it): `experts_fused(x, logits [T, E] f32, bias [E] f32, expert_map [E] i32, w13p, b13p, w2p, b2p,
    acc, count, out)`, the routing of routing.routing_rank_func (needs r.TH <= the block's threads)."""
    why = fused_tile_ok(s, tile) or (fused_routing_ok(s, tile, router) if router is not None else None)
    if why is not None:
        raise ValueError(f"experts_fused: {why}")
    f_dt, f_El, f_K, f_H, f_HX, f_I = s.dtype, s.local_experts, s.top_k, s.hidden, s.hx, s.intermediate
    f_V = vector_elems(f_dt)
    f_BNU, f_BND, f_SK, f_U = tile.block_n_up, tile.block_n_down, tile.split_k, tile.unroll
    f_gated, f_woi, f_bias = s.gated, s.weight_on_input, s.expert_bias
    f_HALF = tile_intermediates(s, f_BNU)
    f_NT13, f_NT2 = s.n13 // f_BNU, f_H // f_BND
    f_act, f_alpha, f_limit = s.activation, s.swiglu_alpha, s.swiglu_limit
    f_NTH, f_R, f_P = fused_split(s, tile)
    f_CGU = f_BNU // f_V  # column groups of a w13 tile (threads along a row)
    f_RH = f_HX // f_SK  # rows of the up reduction per thread
    f_CGD = f_BND // f_V  # column groups of a w2 tile
    f_G = f_H // f_V  # column groups of the output
    f_PER = f_NTH // f_R  # column groups a pass covers
    f_IR = f_HALF // f_R  # intermediates per down thread
    f_vred = tile.vector_red
    f_pre_up, f_pre_down = tile.prefetch in ("up", "both"), tile.prefetch in ("down", "both")
    f_il = tile.interleave
    tok = token_var()
    n_slots = tok * f_K

    def up_row(ks, hb, u):  # row of step u of batch hb of up thread ks
        return (hb * f_U + u) * f_SK + ks if f_il else ks * f_RH + hb * f_U + u

    def down_row(r, ib, u):  # intermediate (within the tile's HALF) of step u of batch ib of down thread r
        return (ib * f_U + u) * f_R + r if f_il else r * f_IR + ib * f_U + u

    @T.macro
    def up_load(w13, wv, e, t, ks, cg, hb, buf):
        """Batch hb of a thread's up rows: U 16-byte loads into register buffer `buf`."""
        for u in T.unroll(f_U):
            wv[T.ramp((buf * f_U + u) * f_V, 1, f_V)] = w13[e, t, up_row(ks, hb, u), T.ramp(cg * f_V, 1, f_V)]

    @T.macro
    def up_sum(xs, acc_u, wv, ks, hb, buf):
        for u in T.unroll(f_U):
            for v in T.unroll(f_V):
                acc_u[v] = acc_u[v] + xs[up_row(ks, hb, u)] * T.Cast("float32", wv[(buf * f_U + u) * f_V + v])

    @T.macro
    def down_load(w2, wv, e, t, r, cg, ib, buf):
        """Batch ib of a down thread's intermediates (rows of w2 tile cg // CGD): U 16-byte loads."""
        for u in T.unroll(f_U):
            wv[T.ramp((buf * f_U + u) * f_V, 1, f_V)] = w2[
                e, cg // f_CGD, t * f_HALF + down_row(r, ib, u), T.ramp(cg % f_CGD * f_V, 1, f_V)]

    @T.macro
    def down_sum(acts, acc_u, wv, r, ib, buf):
        for u in T.unroll(f_U):
            for v in T.unroll(f_V):
                acc_u[v] = acc_u[v] + acts[down_row(r, ib, u)] * T.Cast("float32", wv[(buf * f_U + u) * f_V + v])

    @T.macro
    def body(x, w13, b13, w2, b2, acc, count, out, bx, by, tx, ev, wsl):
        """Block (tile bx, slot by) once its slot is known: ev[0] its local expert (-1: another rank's),
        ev[1] its token, wsl[0] its routing weight."""
        xs = T.alloc_buffer((f_HX,), "float32", scope="shared")  # the slot's input row in fp32
        red = T.alloc_buffer((f_NTH * f_V,), "float32", scope="shared")  # partial sums (up, then down)
        gu = T.alloc_buffer((f_BNU,), "float32", scope="shared")  # the tile's up GEMV sums
        acts = T.alloc_buffer((f_HALF,), "float32", scope="shared")  # its activations (model-dtype values)
        last = T.alloc_buffer((1,), "int32", scope="shared")
        acc_u = T.alloc_buffer((f_V,), "float32", scope="local")
        wv = T.alloc_buffer((2 * f_U * f_V,), f_dt, scope="local")  # two batches of loads (prefetch)
        if ev[0] >= 0:
            # 1. up: thread tx sums rows of columns tx % CGU * V ..; its first batch of weights is asked for
            # before x is staged (the weights depend on the expert only)
            up_load(w13, wv, ev[0], bx, tx // f_CGU, tx % f_CGU, 0, 0)
            for i in range((f_HX + f_NTH - 1) // f_NTH):
                if i * f_NTH + tx < f_HX:
                    xs[i * f_NTH + tx] = T.Cast("float32", x[ev[1], i * f_NTH + tx]) * T.if_then_else(
                        f_woi, wsl[0], T.float32(1))
            T.tvm_storage_sync("shared")
            for v in T.unroll(f_V):
                acc_u[v] = T.float32(0)
            # prefetch: batch hb + 1 is issued before batch hb is summed (two register buffers)
            for hb in T.unroll(f_RH // f_U):
                if f_pre_up:
                    if hb + 1 < f_RH // f_U:
                        up_load(w13, wv, ev[0], bx, tx // f_CGU, tx % f_CGU, hb + 1, (hb + 1) % 2)
                    up_sum(xs, acc_u, wv, tx // f_CGU, hb, hb % 2)
                else:
                    if hb > 0:
                        up_load(w13, wv, ev[0], bx, tx // f_CGU, tx % f_CGU, hb, 0)
                    up_sum(xs, acc_u, wv, tx // f_CGU, hb, 0)
            # the down GEMV's first batch (two with prefetch) of pass 0 is issued now: its loads fly while the
            # sums meet and the activation is computed
            if tx % f_PER < f_G:
                down_load(w2, wv, ev[0], bx, tx // f_PER, tx % f_PER, 0, 0)
                if f_pre_down and f_IR // f_U > 1:
                    down_load(w2, wv, ev[0], bx, tx // f_PER, tx % f_PER, 1, 1)
            for v in T.unroll(f_V):
                red[(tx // f_CGU) * f_BNU + tx % f_CGU * f_V + v] = acc_u[v]
            T.tvm_storage_sync("shared")
            if tx < f_BNU:
                acc_u[0] = T.float32(0)
                for k in range(f_SK):
                    acc_u[0] = acc_u[0] + red[k * f_BNU + tx]
                gu[tx] = acc_u[0] + T.if_then_else(f_bias, T.Cast("float32", b13[ev[0], bx, tx]), T.float32(0))
            T.tvm_storage_sync("shared")
            # 2. the activation, rounded to the model dtype (the unfused path's act buffer)
            if tx < f_HALF:
                if f_gated:
                    acts[tx] = T.Cast("float32", T.Cast(f_dt, _act(f_act, gu[tx], gu[f_HALF + tx], f_alpha, f_limit)))
                else:
                    acts[tx] = T.Cast("float32", T.Cast(f_dt, _act(f_act, gu[tx], None, f_alpha, f_limit)))
            T.tvm_storage_sync("shared")
            # 3-4. down: pass p, thread tx: column group p * PER + tx % PER, intermediates tx // PER * IR ..
            for p in range(f_P):
                if p * f_PER + tx % f_PER < f_G:
                    for v in T.unroll(f_V):
                        acc_u[v] = T.float32(0)
                    if p > 0:  # (pass 0's first batches are in flight since the up GEMV)
                        down_load(w2, wv, ev[0], bx, tx // f_PER, p * f_PER + tx % f_PER, 0, 0)
                        if f_pre_down and f_IR // f_U > 1:
                            down_load(w2, wv, ev[0], bx, tx // f_PER, p * f_PER + tx % f_PER, 1, 1)
                    for ib in T.unroll(f_IR // f_U):
                        if f_pre_down:  # two batches in flight: batch ib + 2 replaces batch ib once summed
                            down_sum(acts, acc_u, wv, tx // f_PER, ib, ib % 2)
                            if ib + 2 < f_IR // f_U:
                                down_load(w2, wv, ev[0], bx, tx // f_PER, p * f_PER + tx % f_PER, ib + 2, ib % 2)
                        else:
                            if ib > 0:
                                down_load(w2, wv, ev[0], bx, tx // f_PER, p * f_PER + tx % f_PER, ib, 0)
                            down_sum(acts, acc_u, wv, tx // f_PER, ib, 0)
                    for v in T.unroll(f_V):
                        red[tx * f_V + v] = acc_u[v]
                T.tvm_storage_sync("shared")
                if tx < f_PER and p * f_PER + tx < f_G:
                    for v in T.unroll(f_V):
                        acc_u[v] = red[tx * f_V + v]
                        for r in range(1, f_R):
                            acc_u[v] = acc_u[v] + red[(r * f_PER + tx) * f_V + v]
                        acc_u[v] = (acc_u[v] + T.if_then_else(
                            f_bias and bx == 0,
                            T.Cast("float32", b2[ev[0], (p * f_PER + tx) // f_CGD, (p * f_PER + tx) % f_CGD * f_V + v]),
                            T.float32(0))) * T.if_then_else(f_woi, T.float32(1), wsl[0])
                    if f_vred:
                        for q in T.unroll(f_V // 4):
                            T.ptx.red.global_.add.v4.f32(
                                T.address_of(acc[ev[1], (p * f_PER + tx) * f_V + q * 4]),
                                acc_u[q * 4], acc_u[q * 4 + 1], acc_u[q * 4 + 2], acc_u[q * 4 + 3])
                    else:
                        for v in T.unroll(f_V):
                            T.evaluate(T.call_extern("float32", "atomicAdd",
                                                     T.address_of(acc[ev[1], (p * f_PER + tx) * f_V + v]), acc_u[v]))
                T.tvm_storage_sync("shared")
        # 5. count this block; the last one writes out and leaves acc and count zero. The barrier orders the
        # block's sums before thread 0's fence and count (a release, as CUTLASS's split-K semaphore)
        T.tvm_storage_sync("shared")
        if tx == 0:
            T.evaluate(T.call_extern("void", "__threadfence"))
            last[0] = T.if_then_else(
                T.call_extern("int32", "atomicAdd", T.address_of(count[0]), 1) == T.Cast("int32", n_slots * f_NT13 - 1),
                1, 0)
        T.tvm_storage_sync("shared")
        ev[2] = T.Cast("int64", last[0])  # (TVM's sync planner takes no shared read in a condition)
        if ev[2] != 0:
            T.evaluate(T.call_extern("void", "__threadfence"))
            for tt in range(tok):  # the sums through L2 (__ldcg: no stale L1 line), a token's loads together
                for j in T.unroll((f_H + f_NTH - 1) // f_NTH):
                    if j * f_NTH + tx < f_H:
                        out[tt, j * f_NTH + tx] = T.Cast(f_dt, T.call_extern(
                            "float32", "__ldcg", T.address_of(acc[tt, j * f_NTH + tx])))
                        acc[tt, j * f_NTH + tx] = T.float32(0)
            if tx == 0:
                count[0] = 0

    @T.prim_func(s_tir=True)
    def experts_fused(x_h: T.handle, tw_h: T.handle, bexp_h: T.handle, w13_h: T.handle, b13_h: T.handle,
                      w2_h: T.handle, b2_h: T.handle, acc_h: T.handle, count_h: T.handle, out_h: T.handle):
        T.func_attr({"tir.noalias": True})
        x = T.match_buffer(x_h, (tok, f_HX), f_dt)
        topk_weights = T.match_buffer(tw_h, (tok, f_K), "float32")
        block_expert = T.match_buffer(bexp_h, (n_slots,), "int32")
        w13 = T.match_buffer(w13_h, (f_El, f_NT13, f_H, f_BNU), f_dt)
        b13 = T.match_buffer(b13_h, (f_El, f_NT13, f_BNU), f_dt)
        w2 = T.match_buffer(w2_h, (f_El, f_NT2, f_I, f_BND), f_dt)
        b2 = T.match_buffer(b2_h, (f_El, f_NT2, f_BND), f_dt)
        acc = T.match_buffer(acc_h, (tok, f_H), "float32")
        count = T.match_buffer(count_h, (1,), "int32")
        out = T.match_buffer(out_h, (tok, f_H), f_dt)
        bx = T.launch_thread("blockIdx.x", f_NT13)
        by = T.launch_thread("blockIdx.y", n_slots)
        tx = T.launch_thread("threadIdx.x", f_NTH)
        ev = T.alloc_buffer((3,), "int64", scope="local")  # the slot's local expert (-1: another rank), token, last
        wsl = T.alloc_buffer((1,), "float32", scope="local")  # the slot's routing weight
        ev[0] = T.Cast("int64", block_expert[by])
        ev[1] = T.Cast("int64", by) // f_K
        wsl[0] = topk_weights[ev[1], T.Cast("int64", by) % f_K]
        body(x, w13, b13, w2, b2, acc, count, out, bx, by, tx, ev, wsl)

    if router is None:
        return experts_fused
    f_r = router
    f_W = f_NTH // 32
    f_S = 1  # threads per expert in the routing: up to 32, as many as the block holds
    while f_S < 32 and f_r.TH * f_S * 2 <= f_NTH:
        f_S *= 2

    @T.prim_func(s_tir=True)
    def experts_fused_routed(x_h: T.handle, logits_h: T.handle, bias_h: T.handle, map_h: T.handle,
                             w13_h: T.handle, b13_h: T.handle, w2_h: T.handle, b2_h: T.handle, acc_h: T.handle,
                             count_h: T.handle, out_h: T.handle):
        T.func_attr({"tir.noalias": True})
        x = T.match_buffer(x_h, (tok, f_HX), f_dt)
        logits = T.match_buffer(logits_h, (tok, f_r.E), "float32")
        bias = T.match_buffer(bias_h, (f_r.E,), "float32")
        expert_map = T.match_buffer(map_h, (f_r.E,), "int32")
        w13 = T.match_buffer(w13_h, (f_El, f_NT13, f_H, f_BNU), f_dt)
        b13 = T.match_buffer(b13_h, (f_El, f_NT13, f_BNU), f_dt)
        w2 = T.match_buffer(w2_h, (f_El, f_NT2, f_I, f_BND), f_dt)
        b2 = T.match_buffer(b2_h, (f_El, f_NT2, f_BND), f_dt)
        acc = T.match_buffer(acc_h, (tok, f_H), "float32")
        count = T.match_buffer(count_h, (1,), "int32")
        out = T.match_buffer(out_h, (tok, f_H), f_dt)
        bx = T.launch_thread("blockIdx.x", f_NT13)
        by = T.launch_thread("blockIdx.y", n_slots)
        tx = T.launch_thread("threadIdx.x", f_NTH)
        ch = T.alloc_buffer((f_r.TH,), "float32", scope="shared")  # every expert's choice
        rred = T.alloc_buffer((f_W,), "float32", scope="shared")  # the warps' partial max | sum
        gtop = T.alloc_buffer((f_r.G,), "float32", scope="shared")  # grouped: each group's best choice ...
        gsec = T.alloc_buffer((f_r.G,), "float32", scope="shared")  # ... and its second best
        picked = T.alloc_buffer((f_r.K,), "float32", scope="shared")  # the picks' scores, by rank
        pick_e = T.alloc_buffer((f_r.K,), "int32", scope="shared")  # the picks, by rank
        v = T.alloc_buffer((5,), "float32", scope="local")
        rk = T.alloc_buffer((2,), "int32", scope="local")
        ev = T.alloc_buffer((3,), "int64", scope="local")  # the slot's local expert (-1: another rank), token, last
        wsl = T.alloc_buffer((1,), "float32", scope="local")  # the slot's routing weight
        ev[1] = T.Cast("int64", by) // f_K
        # the token's routing, as route_dispatch computes it (routing._rank_route): pick k is this block's slot
        _rank_route(f_r, logits, bias, ev[1], tx, f_W, f_S, ch, rred, gtop, gsec, v, rk)
        if rk[0] < f_r.K and tx % f_S == 0:
            pick_e[rk[0]] = tx // f_S
            picked[rk[0]] = v[0]
        T.tvm_storage_sync("shared")
        v[2] = T.float32(0)
        if f_r.renorm:  # the picks' scores summed in pick order, as route_dispatch
            for k in range(f_r.K):
                v[2] = v[2] + picked[k]
            wsl[0] = picked[T.Cast("int64", by) % f_K] / v[2] * T.float32(f_r.scale)
        else:
            wsl[0] = picked[T.Cast("int64", by) % f_K] * T.float32(f_r.scale)
        ev[0] = T.Cast("int64", expert_map[pick_e[T.Cast("int64", by) % f_K]])
        body(x, w13, b13, w2, b2, acc, count, out, bx, by, tx, ev, wsl)

    return experts_fused_routed
