"""Routing kernel: router logits -> top-k expert ids and weights (compute only; schedules live in
moegen/schedule/). Twin: `moegen.reference.route_ref`.

Shape legend: T tokens (symbolic), E experts, K top-k, G expert groups, TG groups kept.

One sblock "route" per token: scores (softmax | sigmoid, fp32), choice = scores (+ correction bias),
grouped top-k masking, K rounds of argmax (lowest index wins a tie), weights from the unbiased scores,
renormalised and scaled. E is small (<= a few hundred), so per-token serial loops are cheap; the
schedule decides how tokens spread over cores or threads.
"""

from __future__ import annotations

from tvm.script import tirx as T

from ..spec import RouterSpec
from . import token_var

NEG_INF = -3.0e38  # finite stand-in for -inf: masked choices stay comparable


def routing_func(num_experts: int, top_k: int, router: RouterSpec):
    """PrimFunc `routing(logits [T, E] f32, bias [E] f32, topk_ids [T, K] i32, topk_weights [T, K] f32)`.

    `bias` is read only when router.correction_bias; it is always an argument so the ABI is fixed.
    """
    r_E, r_K = num_experts, top_k
    r_softmax = router.scoring == "softmax"
    r_use_bias = router.correction_bias
    r_grouped = router.grouped
    r_G = router.num_expert_group if r_grouped else 1
    r_TG = router.topk_group if r_grouped else 1
    r_EG = r_E // r_G
    r_renorm = router.renormalize
    r_scale = float(router.routed_scaling_factor)
    tok = token_var()

    @T.prim_func(s_tir=True)
    def routing(logits_h: T.handle, bias_h: T.handle, ids_h: T.handle, weights_h: T.handle):
        T.func_attr({"tir.noalias": True})
        logits = T.match_buffer(logits_h, (tok, r_E), "float32")
        bias = T.match_buffer(bias_h, (r_E,), "float32")
        topk_ids = T.match_buffer(ids_h, (tok, r_K), "int32")
        topk_weights = T.match_buffer(weights_h, (tok, r_K), "float32")
        for t in range(tok):
            with T.sblock("route"):
                vt = T.axis.spatial(tok, t)
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
                        if r_use_bias and r_EG > 1:
                            gscore[g] = acc[0] + acc[2]  # DeepSeek-V3: sum of the group's top two
                        else:
                            gscore[g] = acc[0]
                        gkeep[g] = 0
                    for _r in range(r_TG):
                        best[0] = -1
                        for g in range(r_G):
                            if gkeep[g] == 0:
                                if best[0] < 0:
                                    best[0] = g
                                elif gscore[g] > gscore[best[0]]:
                                    best[0] = g
                        gkeep[best[0]] = 1
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

    return routing
