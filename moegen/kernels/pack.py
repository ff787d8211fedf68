"""Weight packing kernels: the expert weights into the column-tile layouts the expert GEMMs read
(compute only; schedules live in moegen/schedule/). Run once per weight at load, on the device.
Twins: `moegen.runtime.packing.pack_w13` and `pack_w2` (pure torch, bit-identical results).

Shape legend: El local experts, Hp padded hidden, I intermediate per rank, N13 = 2I (gated) or I
(relu2), BN columns per weight tile, NT tiles (NT13 = N13 / BN, NT2 = Hp / BN), S halves per tile
(2 gated, else 1), W = BN / S source columns per half, R the reduction width (Hp for w13, I for w2).

Both are one transpose of column groups, out[e, t, r, s*W + c] = src[e, (s*NT + t)*W + c, r]:
    pack_w13  w13 [El, N13, Hp] -> out [El, NT13, Hp, BN]  gated: S = 2, half s = 0 takes gate rows
              t*W + c, half s = 1 up rows I + t*W + c (I = NT13 * W); relu2: S = 1, rows t*BN + c
    pack_w2   w2 [El, Hp, I]    -> out [El, NT2, I, BN]    S = 1, rows t*BN + c
(kernels/experts.py documents the layouts.) Every extent is static and int64: El * N13 * Hp passes
2**31 on real layers (DeepSeek-V3: 256 * 4096 * 7168). The caller allocates `out`.
"""

from __future__ import annotations

from tvm.script import tirx as T
from tvm.tirx import IntImm


def _extents(*ns: int):
    return tuple(IntImm("int64", n) for n in ns)


def pack_w13_func(dtype: str, experts: int, n13: int, hidden: int, block_n: int, gated: bool):
    """PrimFunc `pack_w13(w13 [El, N13, Hp], out [El, NT13, Hp, BN])` in packing.pack_w13's order.
    One sblock "pack" over (e, s, t, h, c): out[e, t, h, s*W + c] = w13[e, (s*NT13 + t)*W + c, h]."""
    halves = 2 if gated else 1
    assert n13 % block_n == 0 and block_n % halves == 0, (n13, block_n, gated)
    a_El, a_N, a_H, a_BN, a_NT, a_S, a_W = _extents(experts, n13, hidden, block_n, n13 // block_n, halves,
                                                    block_n // halves)
    a_dt = dtype

    @T.prim_func(s_tir=True)
    def pack_w13(w13_h: T.handle, out_h: T.handle):
        T.func_attr({"tir.noalias": True})
        w13 = T.match_buffer(w13_h, (a_El, a_N, a_H), a_dt)
        out = T.match_buffer(out_h, (a_El, a_NT, a_H, a_BN), a_dt)
        for e, s, t, h, c in T.grid(a_El, a_S, a_NT, a_H, a_W):
            with T.sblock("pack"):
                ve, vs, vt, vh, vc = T.axis.remap("SSSSS", [e, s, t, h, c])
                out[ve, vt, vh, vs * a_W + vc] = w13[ve, (vs * a_NT + vt) * a_W + vc, vh]

    return pack_w13


def pack_w2_func(dtype: str, experts: int, hidden: int, intermediate: int, block_n: int):
    """PrimFunc `pack_w2(w2 [El, Hp, I], out [El, NT2, I, BN])` in packing.pack_w2's order.
    One sblock "pack" over (e, s, t, i, c) (s a unit loop, as pack_w13's): out[e, t, i, c] = w2[e, t*BN + c, i]."""
    assert hidden % block_n == 0, (hidden, block_n)
    b_El, b_H, b_I, b_BN, b_NT, b_S = _extents(experts, hidden, intermediate, block_n, hidden // block_n, 1)
    b_dt = dtype

    @T.prim_func(s_tir=True)
    def pack_w2(w2_h: T.handle, out_h: T.handle):
        T.func_attr({"tir.noalias": True})
        w2 = T.match_buffer(w2_h, (b_El, b_H, b_I), b_dt)
        out = T.match_buffer(out_h, (b_El, b_NT, b_I, b_BN), b_dt)
        for e, s, t, i, c in T.grid(b_El, b_S, b_NT, b_I, b_BN):
            with T.sblock("pack"):
                ve, vs, vt, vi, vc = T.axis.remap("SSSSS", [e, s, t, i, c])
                out[ve, vt, vi, vs * b_BN + vc] = w2[ve, (vs * b_NT + vt) * b_BN + vc, vi]

    return pack_w2
