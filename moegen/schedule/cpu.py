"""CPU schedule rules: parallel over cores, vectorized over weight-tile columns, register tiles.

Shape legend: T tokens, K top-k, Hp padded hidden, I intermediate, BM x BN register tile.
Each rule is `apply(func, target, config) -> Schedule`; tile sizes come only from `config`.
"""

from __future__ import annotations

import tvm
from tvm import s_tir

from .config import ExpertsConfig, PackConfig, fit_pack


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


def pack_block(sch: s_tir.Schedule, name: str, cfg: PackConfig):
    """The sblock "pack" of a kernels/pack.py function (loops e, s, t, k, c) and `cfg` fitted to its
    dtype, k extent and column extent (shared with schedule.cuda)."""
    blk = sch.get_sblock("pack", func_name=name)
    *_, k, c = sch.get_loops(blk)
    region = sch.get(blk).reads[0]
    dtype = (getattr(region, "buffer", None) or region.source).dtype
    tiles = fit_pack(cfg, tvm.runtime.DataType(str(dtype)).bits // 8, int(sch.get(k).extent), int(sch.get(c).extent))
    return blk, tiles


def pack(func, name: str, cfg: PackConfig) -> s_tir.Schedule:
    """(Expert, tile, k tile) over cores; inside, tile_k output rows of tile_n columns, vectorized along
    the columns (contiguous stores, strided loads that stay in cache across the k rows). The CPU runner
    packs with torch (runtime/packing.py); this builds the kernel for the tests, the twin check."""
    sch = _schedule(func, name)
    blk, tiles = pack_block(sch, name, cfg)
    e, s, t, k, c = sch.get_loops(blk)
    ko, ki = sch.split(k, [None, tiles.tile_k])
    co, ci = sch.split(c, [None, tiles.tile_n])
    sch.reorder(e, t, ko, s, co, ki, ci)
    sch.parallel(sch.fuse(e, t, ko))
    sch.vectorize(ci)
    return sch
