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


def _tile_gemm(sch: s_tir.Schedule, name: str, gemm: str, acc_scope: str, split_k: int):
    """(weight tile, sorted block) -> thread block, tile column -> threadIdx.x, and the reduction split
    over split_k threads (threadIdx.y) whose partial sums TVM combines in a cross-thread reduction.
    Blocks past num_blocks (the grid covers every possible one) exit at once."""
    g = sch.get_sblock(gemm, func_name=name)
    nt, b, m, c, r = sch.get_loops(g)
    ro, ri = sch.split(r, [None, split_k])
    sch.reorder(c, m, ri, ro)  # TVM wants the reduction loops innermost for a cross-thread reduction
    sch.bind(nt, "blockIdx.x")
    sch.bind(b, "blockIdx.y")
    sch.bind(c, "threadIdx.x")
    sch.bind(ri, "threadIdx.y")
    sch.set_scope(g, 0, acc_scope)
    return g


def experts_up(func, name: str, cfg: ExpertsConfig) -> s_tir.Schedule:
    sch = _schedule(func, name)
    # the activation pairs column c with column c + BN/2 of the tile: another thread's, so shared
    _tile_gemm(sch, name, "gemm", "shared", cfg.split_k)
    act = sch.get_sblock("act", func_name=name)
    *_, m, c = sch.get_loops(act)
    fused = sch.fuse(m, c)
    _, ti = sch.split(fused, [None, cfg.block_n_up])
    sch.bind(ti, "threadIdx.x")
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
