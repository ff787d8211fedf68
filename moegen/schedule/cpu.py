"""CPU schedule rules: parallel over cores, vectorized over weight-tile columns, register tiles.

Shape legend: T tokens, K top-k, Hp padded hidden, I intermediate, BM x BN register tile.
Each rule is `apply(func, target, config) -> Schedule`; tile sizes come only from `config`.
"""

from __future__ import annotations

import tvm
from tvm import s_tir

from .config import ExpertsConfig


def _schedule(func, name: str) -> s_tir.Schedule:
    return s_tir.Schedule(tvm.IRModule({name: func.with_attr("global_symbol", name)}))


def routing(func, name: str) -> s_tir.Schedule:
    """One token per iteration, tokens spread over cores."""
    sch = _schedule(func, name)
    (t,) = sch.get_loops(sch.get_sblock("route", func_name=name))
    sch.parallel(t)
    return sch


def dispatch(func, name: str) -> s_tir.Schedule:
    """Serial: S = T*K integer updates are microseconds, and the scatter order must stay stable."""
    return _schedule(func, name)


def _gemm_tile(sch: s_tir.Schedule, name: str, gemm: str, epilogue: str) -> None:
    """Tile-major GEMM: weight tiles over cores; per block a BM x BN accumulator kept in registers,
    reduction outermost inside the block so each weight row is loaded once for BM rows."""
    g = sch.get_sblock(gemm, func_name=name)
    nt, b, m, c, r = sch.get_loops(g)
    sch.reorder(r, m, c)
    ep = sch.get_sblock(epilogue, func_name=name)  # already under the block loop: the accumulator
    # tile's allocation lands there and compacts to BM x BN
    sch.set_scope(g, 0, "local")
    sch.parallel(nt)
    sch.vectorize(c)
    sch.unroll(m)
    init = sch.decompose_reduction(g, r)
    # every access to the tile at a constant index (rows unrolled, columns vectors), so LLVM keeps the
    # tile in registers instead of memory
    for blk in (init, ep):
        *_, rows, cols = sch.get_loops(blk)
        sch.unroll(rows)
        sch.vectorize(cols)


def experts_up(func, name: str, cfg: ExpertsConfig) -> s_tir.Schedule:
    sch = _schedule(func, name)
    _gemm_tile(sch, name, "gemm", "act")
    # the gathered fp32 rows: one BM x Hp tile per block, so the GEMM broadcasts fp32 from cache
    # instead of converting a bf16/fp16 element per row per step
    if cfg.gather_rows:
        gather = sch.get_sblock("gather", func_name=name)
        *_, rows, cols = sch.get_loops(gather)
        sch.vectorize(cols)
    return sch


def experts_down(func, name: str, cfg: ExpertsConfig) -> s_tir.Schedule:
    sch = _schedule(func, name)
    _gemm_tile(sch, name, "gemm", "scale")
    return sch


def combine(func, name: str, cfg: ExpertsConfig) -> s_tir.Schedule:
    sch = _schedule(func, name)
    # combine: out[t, n-tile] = sum over K rows of y; tokens x column tiles over cores
    st = sch.get_sblock("store", func_name=name)
    t, n = sch.get_loops(st)
    no, ni = sch.split(n, [None, cfg.combine_n])
    cb = sch.get_sblock("combine", func_name=name)
    sch.compute_at(cb, no)
    sch.set_scope(cb, 0, "local")
    inner = sch.get_loops(cb)[2:]  # [n, k], or [n] when K == 1 (a unit loop is dropped)
    nc, k = (inner[0], inner[1]) if len(inner) == 2 else (inner[0], None)
    if k is not None:
        sch.reorder(k, nc)
    # vectorize and parallelize before decompose_reduction (shared/TVM-NOTES.md)
    sch.vectorize(nc)
    sch.vectorize(ni)
    sch.parallel(sch.fuse(t, no))
    sch.decompose_reduction(cb, k if k is not None else nc)
    return sch
