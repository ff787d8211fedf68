"""Routing kernel: router logits -> top-k expert ids and weights (compute only; schedules live in
moegen/schedule/). Twin: `moegen.reference.route_ref`.

Shape legend: T tokens (symbolic), E experts, K top-k, G expert groups, TG groups kept.

One sblock "route" per token: scores (softmax | sigmoid, fp32), choice = scores (+ correction bias),
grouped top-k masking, K rounds of argmax (lowest index wins a tie), weights from the unbiased scores,
renormalised and scaled. E is small (<= a few hundred), so per-token serial loops are cheap; the
schedule decides how tokens spread over cores or threads.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T

from ..spec import RouterSpec
from . import token_var

NEG_INF = -3.0e38  # finite stand-in for -inf: masked choices stay comparable

# A path without the sort (config `sort: false`, one row per block): slot s = t*K + k is row s of the
# "sorted" order and block s, so routing writes the dispatch buffers itself and no dispatch kernel runs
# (twin: moegen.reference.dispatch_unsorted_ref). Block s's expert is the slot's local expert, -1 when
# another EP rank owns it (the expert kernels skip such blocks); slot_pos is s, or -1 likewise.


@T.macro
def _group_score(g, top, second, top_two: bool, gscore, gkeep):
    """Group g's score from its best and second-best choice: their sum (DeepSeek-V3, with a correction
    bias), else the best; the group starts not kept."""
    if top_two:
        gscore[g] = top + second
    else:
        gscore[g] = top
    gkeep[g] = 0


@T.macro
def _keep_best_groups(G, TG, gscore, gkeep, best):
    """gkeep[g] = 1 for the TG best-scoring of G groups (ties: the lower index), serially."""
    for _r in range(TG):
        best[0] = -1
        for g in range(G):
            if gkeep[g] == 0:
                if best[0] < 0:
                    best[0] = g
                elif gscore[g] > gscore[best[0]]:
                    best[0] = g
        gkeep[best[0]] = 1


@T.macro
def _identity_dispatch(vt, k, K, tok, expert, expert_map, sorted_ids, block_expert, num_blocks, slot_pos):
    """slot vt*K + k (of global expert `expert`) is row and block vt*K + k"""
    sorted_ids[vt * K + k] = T.Cast("int32", vt * K + k)
    block_expert[vt * K + k] = expert_map[expert]
    slot_pos[vt * K + k] = T.if_then_else(expert_map[expert] >= 0, T.Cast("int32", vt * K + k), -1)
    if vt == 0 and k == 0:
        num_blocks[0] = T.Cast("int32", tok * K)


def routing_func(num_experts: int, top_k: int, router: RouterSpec, dispatch: bool = False):
    """PrimFunc `routing(logits [T, E] f32, bias [E] f32, topk_ids [T, K] i32, topk_weights [T, K] f32)`.

    `bias` is read only when router.correction_bias; it is always an argument so the ABI is fixed.
    dispatch: build `route_dispatch` instead, the routing of a path without the sort, which also writes
    that path's dispatch buffers (see _identity_dispatch).
    """
    r_E, r_K = num_experts, top_k
    r_dispatch = dispatch
    r_softmax = router.scoring == "softmax"
    r_use_bias = router.correction_bias
    r_grouped = router.grouped
    r_G = router.num_expert_group if r_grouped else 1
    r_TG = router.topk_group if r_grouped else 1
    r_EG = r_E // r_G
    r_renorm = router.renormalize
    r_scale = float(router.routed_scaling_factor)
    tok = token_var()

    @T.macro
    def route(logits, bias, topk_ids, topk_weights, expert_map, sorted_ids, block_expert, num_blocks, slot_pos):
        for t in range(tok):
            with T.sblock("route"):
                vt = T.axis.spatial(tok, t)
                if r_dispatch:
                    T.reads(logits[vt, 0:r_E], bias[0:r_E], expert_map[0:r_E])
                    T.writes(topk_ids[vt, 0:r_K], topk_weights[vt, 0:r_K], sorted_ids[vt * r_K:vt * r_K + r_K],
                             block_expert[vt * r_K:vt * r_K + r_K], slot_pos[vt * r_K:vt * r_K + r_K], num_blocks[0])
                else:
                    T.reads(logits[vt, 0:r_E], bias[0:r_E])
                    T.writes(topk_ids[vt, 0:r_K], topk_weights[vt, 0:r_K])
                scores = T.sblock_alloc_buffer((r_E,), "float32", scope="local")
                choice = T.sblock_alloc_buffer((r_E,), "float32", scope="local")
                taken = T.sblock_alloc_buffer((r_E,), "int32", scope="local")
                gscore = T.sblock_alloc_buffer((r_G,), "float32", scope="local")
                gkeep = T.sblock_alloc_buffer((r_G,), "int32", scope="local")
                acc = T.sblock_alloc_buffer((3,), "float32", scope="local")  # max, sum, second max
                best = T.sblock_alloc_buffer((1,), "int32", scope="local")
                # scores
                if r_softmax:
                    acc[0] = T.float32(NEG_INF)
                    for e in range(r_E):
                        acc[0] = T.max(acc[0], logits[vt, e])
                    acc[1] = T.float32(0)
                    for e in range(r_E):
                        scores[e] = T.exp(logits[vt, e] - acc[0])
                        acc[1] = acc[1] + scores[e]
                    for e in range(r_E):
                        scores[e] = scores[e] / acc[1]
                else:
                    for e in range(r_E):
                        scores[e] = T.sigmoid(logits[vt, e])
                for e in range(r_E):
                    taken[e] = 0
                    if r_use_bias:
                        choice[e] = scores[e] + bias[e]
                    else:
                        choice[e] = scores[e]
                # grouped top-k: keep the TG best groups, mask the rest out of the choice
                if r_grouped:
                    for g in range(r_G):
                        acc[0] = T.float32(NEG_INF)
                        acc[2] = T.float32(NEG_INF)
                        for j in range(r_EG):
                            if choice[g * r_EG + j] > acc[0]:
                                acc[2] = acc[0]
                                acc[0] = choice[g * r_EG + j]
                            elif choice[g * r_EG + j] > acc[2]:
                                acc[2] = choice[g * r_EG + j]
                        _group_score(g, acc[0], acc[2], r_use_bias and r_EG > 1, gscore, gkeep)
                    _keep_best_groups(r_G, r_TG, gscore, gkeep, best)
                    for e in range(r_E):
                        if gkeep[e // r_EG] == 0:
                            choice[e] = T.float32(NEG_INF)
                # K rounds of argmax over the choice
                acc[1] = T.float32(0)
                for k in range(r_K):
                    best[0] = -1
                    for e in range(r_E):
                        if taken[e] == 0:
                            if best[0] < 0:
                                best[0] = e
                            elif choice[e] > choice[best[0]]:
                                best[0] = e
                    taken[best[0]] = 1
                    topk_ids[vt, k] = best[0]
                    topk_weights[vt, k] = scores[best[0]]
                    acc[1] = acc[1] + scores[best[0]]
                for k in range(r_K):
                    if r_renorm:
                        topk_weights[vt, k] = topk_weights[vt, k] / acc[1] * T.float32(r_scale)
                    else:
                        topk_weights[vt, k] = topk_weights[vt, k] * T.float32(r_scale)
                if r_dispatch:
                    for k in range(r_K):
                        _identity_dispatch(vt, k, r_K, tok, topk_ids[vt, k], expert_map, sorted_ids, block_expert,
                                           num_blocks, slot_pos)

    if r_dispatch:
        return _route_dispatch(route, r_E, r_K, tok)

    @T.prim_func(s_tir=True)
    def routing(logits_h: T.handle, bias_h: T.handle, ids_h: T.handle, weights_h: T.handle):
        T.func_attr({"tir.noalias": True})
        logits = T.match_buffer(logits_h, (tok, r_E), "float32")
        bias = T.match_buffer(bias_h, (r_E,), "float32")
        topk_ids = T.match_buffer(ids_h, (tok, r_K), "int32")
        topk_weights = T.match_buffer(weights_h, (tok, r_K), "float32")
        route(logits, bias, topk_ids, topk_weights, None, None, None, None, None)

    return routing


def routing_warp_func(num_experts: int, top_k: int, router: RouterSpec, warps: int, dispatch: bool = False):
    """The same contract as routing_func, one warp per token: lane l holds experts l, l + 32, ...;
    maxima, sums and each of the K argmaxes are warp shuffles (ties: the lower index, as routing_func).
    Grouped top-k: each group's top one or two choices are a warp merge of the lanes' own, the TG kept
    groups a serial pick every lane repeats (G is small). An algorithm for 32-lane hardware, so it names
    its threads. dispatch: `route_dispatch`, as routing_func."""
    w_E, w_K, w_W = num_experts, top_k, warps
    w_grouped = router.grouped
    w_G = router.num_expert_group if w_grouped else 1
    w_TG = router.topk_group if w_grouped else 1
    w_EG = w_E // w_G
    w_dispatch = dispatch
    w_L = (w_E + 31) // 32  # experts per lane
    w_KL = (w_K + 31) // 32  # picks per lane (lane k % 32 keeps pick k)
    w_softmax = router.scoring == "softmax"
    w_use_bias = router.correction_bias
    w_renorm = router.renormalize
    w_scale = float(router.routed_scaling_factor)
    tok = token_var()

    @T.macro
    def route(logits, bias, topk_ids, topk_weights, expert_map, sorted_ids, block_expert, num_blocks, slot_pos):
        bx = T.launch_thread("blockIdx.x", (tok + (w_W - 1)) // w_W)
        ty = T.launch_thread("threadIdx.y", w_W)
        tx = T.launch_thread("threadIdx.x", 32)
        sc = T.alloc_buffer((w_L,), "float32", scope="local")
        ch = T.alloc_buffer((w_L,), "float32", scope="local")
        tk = T.alloc_buffer((w_L,), "int32", scope="local")
        red = T.alloc_buffer((6,), "float32", scope="local")  # max, sum, best choice, its score, picked sum, tmp
        idx = T.alloc_buffer((2,), "int32", scope="local")  # best expert, tmp
        pick = T.alloc_buffer((w_KL,), "int32", scope="local")  # this lane's picks: expert, then weight
        pick_w = T.alloc_buffer((w_KL,), "float32", scope="local")
        gscore = T.alloc_buffer((w_G,), "float32", scope="local")  # grouped: each group's score
        gkeep = T.alloc_buffer((w_G,), "int32", scope="local")  # grouped: 1 for the TG kept groups
        if bx * w_W + ty < tok:
            for j in range(w_L):
                if j * 32 + tx < w_E:
                    sc[j] = logits[bx * w_W + ty, j * 32 + tx]
                    tk[j] = 0
                else:
                    sc[j] = T.float32(NEG_INF)
                    tk[j] = 1
            if w_softmax:
                red[0] = T.float32(NEG_INF)
                for j in range(w_L):
                    red[0] = T.max(red[0], sc[j])
                for o in range(5):
                    red[0] = T.max(red[0], T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), red[0], 16 >> o, 32, 32))
                red[1] = T.float32(0)
                for j in range(w_L):
                    if tk[j] == 0:
                        sc[j] = T.exp(sc[j] - red[0])
                        red[1] = red[1] + sc[j]
                for o in range(5):
                    red[1] = red[1] + T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), red[1], 16 >> o, 32, 32)
                for j in range(w_L):
                    sc[j] = sc[j] / red[1]
            else:
                for j in range(w_L):
                    sc[j] = T.sigmoid(sc[j])
            for j in range(w_L):
                if w_use_bias:
                    ch[j] = sc[j] + T.if_then_else(j * 32 + tx < w_E, bias[T.min(j * 32 + tx, w_E - 1)], T.float32(0))
                else:
                    ch[j] = sc[j]
            if w_grouped:  # keep the TG best groups, mask the rest out of the choice (as routing_func)
                for g in range(w_G):
                    red[0] = T.float32(NEG_INF)  # the group's best choice, then its second
                    red[2] = T.float32(NEG_INF)
                    for j in range(w_L):
                        if tk[j] == 0:
                            if (j * 32 + tx) // w_EG == g:
                                if ch[j] > red[0]:
                                    red[2] = red[0]
                                    red[0] = ch[j]
                                elif ch[j] > red[2]:
                                    red[2] = ch[j]
                    for o in range(5):  # merge two lanes' top two: the top two of the four
                        red[5] = T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), red[0], 16 >> o, 32, 32)
                        red[1] = T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), red[2], 16 >> o, 32, 32)
                        red[3] = T.max(T.min(red[0], red[5]), T.max(red[2], red[1]))
                        red[0] = T.max(red[0], red[5])
                        red[2] = red[3]
                    _group_score(g, red[0], red[2], w_use_bias and w_EG > 1, gscore, gkeep)
                _keep_best_groups(w_G, w_TG, gscore, gkeep, idx)
                for j in range(w_L):
                    if tk[j] == 0:
                        if gkeep[(j * 32 + tx) // w_EG] == 0:
                            ch[j] = T.float32(NEG_INF)
            red[4] = T.float32(0)
            for k in range(w_K):
                red[2] = T.float32(NEG_INF)
                red[3] = T.float32(0)
                idx[0] = w_E
                for j in range(w_L):
                    if tk[j] == 0:
                        if ch[j] > red[2] or idx[0] == w_E:
                            red[2] = ch[j]
                            red[3] = sc[j]
                            idx[0] = j * 32 + tx
                for o in range(5):
                    red[5] = T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), red[2], 16 >> o, 32, 32)
                    idx[1] = T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), idx[0], 16 >> o, 32, 32)
                    red[1] = T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), red[3], 16 >> o, 32, 32)
                    if idx[1] < w_E:
                        if idx[0] == w_E or red[5] > red[2] or (red[5] == red[2] and idx[1] < idx[0]):
                            red[2] = red[5]
                            red[3] = red[1]
                            idx[0] = idx[1]
                for j in range(w_L):  # (constant indices keep tk in registers)
                    if idx[0] == j * 32 + tx:
                        tk[j] = 1
                red[4] = red[4] + red[3]
                if tx == k % 32:
                    pick[k // 32] = idx[0]
                    pick_w[k // 32] = red[3]
            # lane k writes pick k: K lanes store at once, and no lane reads back what another wrote
            for r in range(w_KL):
                if r * 32 + tx < w_K:
                    topk_ids[bx * w_W + ty, r * 32 + tx] = pick[r]
                    if w_renorm:
                        topk_weights[bx * w_W + ty, r * 32 + tx] = pick_w[r] / red[4] * T.float32(w_scale)
                    else:
                        topk_weights[bx * w_W + ty, r * 32 + tx] = pick_w[r] * T.float32(w_scale)
                    if w_dispatch:
                        _identity_dispatch(bx * w_W + ty, r * 32 + tx, w_K, tok, pick[r], expert_map, sorted_ids,
                                           block_expert, num_blocks, slot_pos)

    return _route_dispatch(route, w_E, w_K, tok) if w_dispatch else _routing(route, w_E, w_K, tok)


@T.macro
def _block_reduce(val, is_max: bool, lane, warp, W, red, out, i):
    """out[i] = the max (or sum) of `val` over the thread block's W warps: a warp shuffle tree, then the
    W warp results through shared memory `red`, which every thread adds up in the same order (so all
    hold the same value). Barriers on both sides of `red`'s use: it can be reused at once."""
    out[i] = val
    for o in range(5):
        if is_max:
            out[i] = T.max(out[i], T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), out[i], 16 >> o, 32, 32))
        else:
            out[i] = out[i] + T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), out[i], 16 >> o, 32, 32)
    if lane == 0:
        red[warp] = out[i]
    T.tvm_storage_sync("shared")
    out[i] = red[0]
    for w in range(1, W):
        if is_max:
            out[i] = T.max(out[i], red[w])
        else:
            out[i] = out[i] + red[w]
    T.tvm_storage_sync("shared")


@T.macro
def _rank(ch, lo, n, c, e, out, i, tmp, ti):
    """out[i] = how many of the choices ch[lo .. lo + n) (shared memory, read through the register
    tmp[ti]: a branch may not read shared memory) beat choice c of index e: greater, or equal at a
    lower index (the order in which the argmax rounds of routing_func pick)."""
    out[i] = 0
    for j in range(n):
        tmp[ti] = ch[lo + j]
        if tmp[ti] > c or (tmp[ti] == c and lo + j < e):
            out[i] = out[i] + 1


@dataclass(frozen=True)
class RankRouter:
    """What the rank routing (routing_rank_func, and the fused decode kernel's own routing) specialises on."""

    E: int  # experts
    K: int  # top-k
    grouped: bool
    G: int  # expert groups (1 ungrouped)
    TG: int  # groups kept
    top_two: bool  # a group's score: its best two (see _group_score)
    softmax: bool  # else sigmoid
    use_bias: bool  # correction bias on the choice
    renorm: bool
    scale: float  # routed scaling factor

    @property
    def TH(self) -> int:  # threads that hold an expert: every expert, padded to whole warps
        return (self.E + 31) // 32 * 32

    @property
    def EG(self) -> int:
        return self.E // self.G


def rank_router(num_experts: int, top_k: int, router: RouterSpec) -> RankRouter:
    grouped = router.grouped
    G = router.num_expert_group if grouped else 1
    return RankRouter(num_experts, top_k, grouped, G, router.topk_group if grouped else 1,
                      router.correction_bias and num_experts // G > 1, router.scoring == "softmax",
                      router.correction_bias, router.renormalize, float(router.routed_scaling_factor))


@T.macro
def _rank_route(r, logits, bias, row, tx, W, S, ch, red, gtop, gsec, v, rk):
    """Rank routing of token `row` by a thread block of W warps, S threads (a power of two up to 32) per
    expert: threads tx = e * S .. e * S + S - 1 hold expert e < r.E. v[0] = its score, v[1] = its choice,
    rk[0] = its rank (a pick when below K), every one of the S threads; each counts 1/S of the choices that
    beat it and the S counts meet by warp shuffles. Threads past r.TH * S take part in the block reductions
    only. See routing_rank_func (S = 1)."""
    e = T.meta_var(tx // S)  # (an expression, not a variable: tx itself when S == 1)
    real = e < r.E
    v[0] = T.if_then_else(real, logits[row, T.min(e, r.E - 1)], T.float32(NEG_INF))
    if r.softmax:
        _block_reduce(v[0], True, tx % 32, tx // 32, W, red, v, 2)
        v[0] = T.if_then_else(real, T.exp(v[0] - v[2]), T.float32(0))
        _block_reduce(T.if_then_else(tx % S == 0, v[0], T.float32(0)), False, tx % 32, tx // 32, W, red, v, 2)
        v[0] = v[0] / v[2]
    else:
        v[0] = T.sigmoid(v[0])
    if r.use_bias:
        v[1] = v[0] + T.if_then_else(real, bias[T.min(e, r.E - 1)], T.float32(0))
    else:
        v[1] = v[0]
    # a total order: NaN and anything below NEG_INF count as NEG_INF, the padding threads are NEG_INF
    # and come after every expert (higher index), so they are never picked
    v[1] = T.if_then_else(real and not T.isnan(v[1]), T.max(v[1], T.float32(NEG_INF)), T.float32(NEG_INF))
    if e < r.TH and tx % S == 0:
        ch[e] = v[1]
    T.tvm_storage_sync("shared")
    if r.grouped:
        if real:
            _rank(ch, e // r.EG * r.EG, r.EG, v[1], e, rk, 1, v, 4)  # the rank in its group
            if rk[1] == 0 and tx % S == 0:
                gtop[e // r.EG] = v[1]
            if r.top_two:
                if rk[1] == 1 and tx % S == 0:
                    gsec[e // r.EG] = v[1]
        T.tvm_storage_sync("shared")
        if real:  # the rank of this expert's group among the G group scores
            v[3] = gtop[e // r.EG] + gsec[e // r.EG] if r.top_two else gtop[e // r.EG]
            rk[1] = 0
            for g in range(r.G):
                v[4] = gtop[g] + gsec[g] if r.top_two else gtop[g]
                if v[4] > v[3] or (v[4] == v[3] and g < e // r.EG):
                    rk[1] = rk[1] + 1
            if rk[1] >= r.TG:
                v[1] = T.float32(NEG_INF)
        T.tvm_storage_sync("shared")
        if e < r.TH and tx % S == 0:
            ch[e] = v[1]
        T.tvm_storage_sync("shared")
    if S == 1:
        rk[0] = r.K  # threads past TH: no pick
        if tx < r.TH:
            _rank(ch, 0, r.TH, v[1], tx, rk, 0, v, 4)
    else:  # choices tx % S, tx % S + S, ... of the TH, then the S counts summed
        rk[0] = 0
        if e < r.TH:
            for j in range(r.TH // S):
                v[4] = ch[j * S + tx % S]
                if v[4] > v[1] or (v[4] == v[1] and j * S + tx % S < e):
                    rk[0] = rk[0] + 1
        for o in range(S.bit_length() - 1):
            rk[0] = rk[0] + T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), rk[0], S >> (o + 1), 32, 32)
        if e >= r.TH:
            rk[0] = r.K


def routing_rank_func(num_experts: int, top_k: int, router: RouterSpec, dispatch: bool = False):
    """The same contract as routing_func, one thread block per token and a thread per expert, for few
    tokens (the decode path's route_dispatch), where routing is latency: a warp's K serial rounds of
    shuffled argmaxes took ~4 us of Qwen3-30B-A3B's one-token layer. Here expert e is a pick when its
    choice ranks below K (how many choices beat it: greater, or equal at a lower index, as the rounds
    pick), counted in one pass over the E choices in shared memory, all experts at once; the rank is
    the pick's position. Softmax max and sum are block reductions. Grouped top-k: each expert's rank
    in its group names the group's best and second-best choice, each group's rank among the G group
    scores says whether it is kept (ties: the lower index, as _keep_best_groups). A choice that is NaN
    or below NEG_INF counts as NEG_INF, so the ranks are a total order and exactly K experts, all real,
    are picked. An algorithm for 32-lane hardware (warp shuffles), so it names its threads (_rank_route,
    which the fused decode kernel runs too)."""
    r = rank_router(num_experts, top_k, router)
    k_E, k_K, k_TH = r.E, r.K, r.TH
    k_W = k_TH // 32
    k_renorm, k_scale, k_dispatch = r.renorm, r.scale, dispatch
    tok = token_var()

    @T.macro
    def route(logits, bias, topk_ids, topk_weights, expert_map, sorted_ids, block_expert, num_blocks, slot_pos):
        bx = T.launch_thread("blockIdx.x", tok)
        tx = T.launch_thread("threadIdx.x", k_TH)
        ch = T.alloc_buffer((k_TH,), "float32", scope="shared")  # every thread's choice
        red = T.alloc_buffer((k_W,), "float32", scope="shared")  # the warps' partial max | sum
        gtop = T.alloc_buffer((r.G,), "float32", scope="shared")  # grouped: each group's best choice ...
        gsec = T.alloc_buffer((r.G,), "float32", scope="shared")  # ... and its second best
        picked = T.alloc_buffer((k_K,), "float32", scope="shared")  # the picks' scores, by rank
        v = T.alloc_buffer((5,), "float32", scope="local")  # score, choice, reduction, group score, tmp
        rk = T.alloc_buffer((2,), "int32", scope="local")  # rank, rank of the group (or in it)
        _rank_route(r, logits, bias, bx, tx, k_W, 1, ch, red, gtop, gsec, v, rk)
        if rk[0] < k_K:
            topk_ids[bx, rk[0]] = tx
            if k_dispatch:
                _identity_dispatch(bx, rk[0], k_K, tok, tx, expert_map, sorted_ids, block_expert, num_blocks,
                                   slot_pos)
            if k_renorm:
                picked[rk[0]] = v[0]
            else:
                topk_weights[bx, rk[0]] = v[0] * T.float32(k_scale)
        if k_renorm:  # the picks' scores summed in pick order, as routing_func
            T.tvm_storage_sync("shared")
            if rk[0] < k_K:
                v[2] = T.float32(0)
                for k in range(k_K):
                    v[2] = v[2] + picked[k]
                topk_weights[bx, rk[0]] = v[0] / v[2] * T.float32(k_scale)

    return _route_dispatch(route, k_E, k_K, tok) if k_dispatch else _routing(route, k_E, k_K, tok)


def _routing(route, E: int, K: int, tok):
    """PrimFunc `routing(logits [T, E] f32, bias [E] f32, topk_ids [T, K] i32, topk_weights [T, K] f32)`
    around a routing body `route` (a macro that names its threads)."""

    @T.prim_func
    def routing(logits_h: T.handle, bias_h: T.handle, ids_h: T.handle, weights_h: T.handle):
        T.func_attr({"tir.noalias": True})
        logits = T.match_buffer(logits_h, (tok, E), "float32")
        bias = T.match_buffer(bias_h, (E,), "float32")
        topk_ids = T.match_buffer(ids_h, (tok, K), "int32")
        topk_weights = T.match_buffer(weights_h, (tok, K), "float32")
        route(logits, bias, topk_ids, topk_weights, None, None, None, None, None)

    return routing


def _route_dispatch(route, E: int, K: int, tok):
    """PrimFunc `route_dispatch(logits [T, E] f32, bias [E] f32, expert_map [E] i32, topk_ids [T, K] i32,
    topk_weights [T, K] f32, sorted_ids [S] i32, block_expert [S] i32, num_blocks [1] i32, slot_pos [S] i32)`
    around a routing body `route` (a macro): the dispatch buffers of a path without the sort (MB = S)."""

    @T.prim_func(s_tir=True)
    def route_dispatch(logits_h: T.handle, bias_h: T.handle, map_h: T.handle, ids_h: T.handle,
                       weights_h: T.handle, sorted_h: T.handle, bexp_h: T.handle, nblk_h: T.handle,
                       pos_h: T.handle):
        T.func_attr({"tir.noalias": True})
        logits = T.match_buffer(logits_h, (tok, E), "float32")
        bias = T.match_buffer(bias_h, (E,), "float32")
        expert_map = T.match_buffer(map_h, (E,), "int32")
        topk_ids = T.match_buffer(ids_h, (tok, K), "int32")
        topk_weights = T.match_buffer(weights_h, (tok, K), "float32")
        sorted_ids = T.match_buffer(sorted_h, (tok * K,), "int32")
        block_expert = T.match_buffer(bexp_h, (tok * K,), "int32")
        num_blocks = T.match_buffer(nblk_h, (1,), "int32")
        slot_pos = T.match_buffer(pos_h, (tok * K,), "int32")
        route(logits, bias, topk_ids, topk_weights, expert_map, sorted_ids, block_expert, num_blocks, slot_pos)

    return route_dispatch
