"""CUDA schedule rules (first version: correct, simple, CUDA-core arithmetic).

Shape legend: T tokens, K top-k, Hp padded hidden, I intermediate, BM x BN tile, NT weight tiles.
Each rule is `apply(func, name, config)`; thread counts and tiles come from `config` only.

What this version does not do yet (issue 3): tensor cores (mma.sync / wgmma), a decode path that splits
the reduction across warps, a parallel dispatch. (Weight tile, sorted block) pairs map to thread blocks,
tile columns to threads, so loads of a weight row are coalesced and used for the block's BM rows.
"""

from __future__ import annotations

from tvm import s_tir

from .config import ExpertsConfig
from .cpu import _schedule


def routing(func, name: str, threads: int = 128) -> s_tir.Schedule:
    """One thread per token."""
    sch = _schedule(func, name)
    (t,) = sch.get_loops(sch.get_sblock("route", func_name=name))
    to, ti = sch.split(t, [None, threads])
    sch.bind(to, "blockIdx.x")
    sch.bind(ti, "threadIdx.x")
    return sch


def routing_warps(func, name: str) -> s_tir.Schedule:
    """kernels.routing.routing_warp_func names its threads itself: nothing left to schedule."""
    return _schedule(func, name)


def dispatch(func, name: str) -> s_tir.Schedule:
    """The serial dispatch on one thread (kept for comparison: dispatch_threads replaces it)."""
    sch = _schedule(func, name)
    blk = sch.get_sblock("dispatch", func_name=name)
    (one,) = sch.get_loops(blk)
    sch.bind(one, "threadIdx.x")
    sch.bind(sch.add_unit_loop(one), "blockIdx.x")
    return sch


def dispatch_threads(func, name: str) -> s_tir.Schedule:
    """kernels.dispatch.dispatch_threads_func names its threads itself: nothing left to schedule."""
    return _schedule(func, name)


def _tile_gemm(sch: s_tir.Schedule, name: str, gemm: str, acc_scope: str, split_k: int,
               pair_halves: bool = False):
    """(weight tile, sorted block) -> thread block, tile column -> threadIdx.x. Blocks past num_blocks
    (the grid covers every possible one) exit at once.

    split_k > 1 (decode, one row per block): the reduction is split over threadIdx.y and TVM combines
    the partial sums in a cross-thread reduction, which needs the reduction loops innermost.
    split_k == 1 (several rows per block): each thread keeps its BM row sums in registers, reduction
    outermost, so each weight element is loaded once for the BM rows; with pair_halves a thread owns
    the two columns the gated activation combines, so the tile never leaves registers."""
    g = sch.get_sblock(gemm, func_name=name)
    nt, b, m, c, r = sch.get_loops(g)
    sch.bind(nt, "blockIdx.x")
    sch.bind(b, "blockIdx.y")
    if split_k > 1:
        ro, ri = sch.split(r, [None, split_k])
        sch.reorder(c, m, ri, ro)
        sch.bind(c, "threadIdx.x")
        sch.bind(ri, "threadIdx.y")
        sch.set_scope(g, 0, acc_scope)
        return g
    if pair_halves:  # thread t owns columns t and t + BN/2: a gate column and its up column
        ch, cl = sch.split(c, [2, None])
        sch.reorder(cl, r, m, ch)
        sch.bind(cl, "threadIdx.x")
        sch.unroll(ch)
    else:
        sch.reorder(c, r, m)
        sch.bind(c, "threadIdx.x")
    sch.set_scope(g, 0, "local")
    sch.unroll(m)
    sch.decompose_reduction(g, r)
    return g


def experts_up(func, name: str, cfg: ExpertsConfig) -> s_tir.Schedule:
    sch = _schedule(func, name)
    act = sch.get_sblock("act", func_name=name)
    if cfg.split_k > 1:
        # the cross-thread reduction leaves each column's sum with one thread; the activation pairs
        # column c with c + BN/2, another thread's: the tile goes through shared memory
        _tile_gemm(sch, name, "gemm", "shared", cfg.split_k)
        *_, m, c = sch.get_loops(act)
        _, ti = sch.split(sch.fuse(m, c), [None, cfg.block_n_up])
        sch.bind(ti, "threadIdx.x")
        return sch
    *_, m, c = sch.get_loops(act)
    gated = int(sch.get(c).extent) * 2 == cfg.block_n_up  # act makes BN/2 outputs from BN sums
    _tile_gemm(sch, name, "gemm", "local", 1, pair_halves=gated)
    sch.reorder(c, m)
    sch.bind(c, "threadIdx.x")
    sch.unroll(m)
    return sch


def experts_down(func, name: str, cfg: ExpertsConfig) -> s_tir.Schedule:
    sch = _schedule(func, name)
    _tile_gemm(sch, name, "gemm", "local", cfg.split_k)
    scale = sch.get_sblock("scale", func_name=name)
    *_, m, c = sch.get_loops(scale)
    sch.reorder(c, m)
    sch.bind(c, "threadIdx.x")
    return sch


def combine(func, name: str, cfg: ExpertsConfig) -> s_tir.Schedule:
    """Tokens x column tiles -> thread blocks, columns -> threads, the K-sum in a register."""
    sch = _schedule(func, name)
    st = sch.get_sblock("store", func_name=name)
    t, n = sch.get_loops(st)
    no, ni = sch.split(n, [None, cfg.combine_n])
    sch.bind(sch.fuse(t, no), "blockIdx.x")
    sch.bind(ni, "threadIdx.x")
    cb = sch.get_sblock("combine", func_name=name)
    sch.compute_at(cb, ni)
    sch.set_scope(cb, 0, "local")
    return sch
