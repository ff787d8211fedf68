"""CUDA schedule rules: warp routing, the dispatch (one thread block, or tiles of slots over many: the
kernels name their threads), expert GEMMs on CUDA cores (one row per
block: split-K decode, with 16-byte weight loads when config.vector_loads; a few rows: register
tiles) or on tensor cores (config.mma: ldmatrix + mma.sync).

Shape legend: T tokens, K top-k, Hp padded hidden, I intermediate, BM x BN tile, NT weight tiles,
BK reduction step, warp_m x warp_n the piece of a tile one warp computes.
Each rule is `apply(func, name, config)`; thread counts and tiles come from `config` only.
(Weight tile, sorted block) pairs map to thread blocks; blocks past num_blocks exit at once.
Weight packing (kernels/pack.py, once at load): a register transpose of V x V blocks, 16-byte
accesses on both sides (`pack`).
A decode path without the sort (config.sort false) skips the dispatch kernel: its blocks of another
EP rank's experts exit with the blocks past num_blocks. Tensor-core tiles may live in dynamic shared
memory (config.dynamic_smem) to pass 48 KiB, and their grid may be rastered in groups of sorted blocks
that share a weight tile (config.group_m, applied by _exit_past_blocks).
On Hopper, paths with config.wgmma take the thread-level kernels of kernels/experts_wgmma.py instead
(warpgroup MMA, accumulators and epilogue in registers): `experts_wgmma` has nothing left to schedule.
"""

from __future__ import annotations

import tvm
from tvm import s_tir

from . import GRID_WAIT
from .config import ExpertsConfig, PackConfig, fit_divisor, prefetches
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
    """kernels.routing's GPU kernels (routing_warp_func, routing_rank_func) name their threads
    themselves: nothing left to schedule."""
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


def experts_fused(func, name: str) -> s_tir.Schedule:
    """kernels.experts_fused names its threads, shared memory and atomics itself: nothing left to schedule."""
    return _schedule(func, name)


def experts_wgmma(func, name: str) -> s_tir.Schedule:
    """kernels.experts_wgmma names its threads, shared memory and instructions itself: nothing to schedule."""
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
    if cfg.mma:  # kernels built with stage_operands: gathered rows x the expert's tile on tensor cores
        warps, lanes = _mma_gemm(sch, name, cfg, cfg.block_n_up, _dtype(func), "gather", "xs")
        _epilogue_threads(sch, sch.get_sblock("act", func_name=name), warps, lanes)
        return _exit_past_blocks(sch, name, cfg)
    if cfg.vector_loads:  # decode: 16-byte weight loads, split-K partials through shared memory
        _split_k_vector_gemm(sch, name, cfg, cfg.block_n_up, _vector(func), "act", prefetches(cfg, "up"))
        return _exit_past_blocks(sch, name, cfg)
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
    if cfg.mma:
        warps, lanes = _mma_gemm(sch, name, cfg, cfg.block_n_down, _dtype(func), None, "act")
        _epilogue_threads(sch, sch.get_sblock("scale", func_name=name), warps, lanes)
        return _exit_past_blocks(sch, name, cfg)
    if cfg.vector_loads:
        _split_k_vector_gemm(sch, name, cfg, cfg.block_n_down, _vector(func), "scale", prefetches(cfg, "down"))
        return _wait_after_first_weights(_exit_past_blocks(sch, name, cfg), name)
    _tile_gemm(sch, name, "gemm", "local", cfg.split_k)
    scale = sch.get_sblock("scale", func_name=name)
    *_, m, c = sch.get_loops(scale)
    sch.reorder(c, m)
    sch.bind(c, "threadIdx.x")
    return sch


def combine(func, name: str, cfg: ExpertsConfig) -> s_tir.Schedule:
    """Tokens x column tiles -> thread blocks, combine_vector adjacent columns -> one thread (one vector
    load of each of its K rows, one vector store), the K-sums in registers."""
    sch = _schedule(func, name)
    st = sch.get_sblock("store", func_name=name)
    t, n = sch.get_loops(st)
    v = cfg.combine_vector
    no, ni, nv = sch.split(n, [None, cfg.combine_n // v, v])
    sch.bind(sch.fuse(t, no), "blockIdx.x")
    sch.bind(ni, "threadIdx.x")
    cb = sch.get_sblock("combine", func_name=name)
    sch.compute_at(cb, ni)
    sch.set_scope(cb, 0, "local")
    if v > 1:
        if len(sch.get_loops(cb)) == 3:  # top_k 1: compute_at dropped the unit K loop; the vector needs one
            sch.add_unit_loop(cb)
        cols, k = sch.get_loops(cb)[-2:]
        sch.reorder(k, cols)
        sch.unroll(cols)
        # the vector: a copy of the row piece into registers (the sum itself stays scalar: a vectorized
        # fp32 select of zero does not compile in TVM's CUDA codegen)
        piece = sch.cache_read(cb, _read_index(sch, cb, "y"), "local")
        sch.compute_at(piece, k)
        sch.vectorize(sch.get_loops(piece)[-1])
        sch.vectorize(nv)
    return sch


# ---- tensor cores (cfg.mma) ---------------------------------------------------------------------
# The GEMM of a (weight tile, sorted block) thread block is a plain BM x BN x (Hp | I) matmul of two
# staged operands (kernels.experts stage_operands): the A rows and the expert's B tile go through shared
# memory in block_k steps, each warp loads 16x16 fragments with ldmatrix and accumulates its
# warp_m x warp_n piece with mma.sync in registers; the accumulator tile lands in shared memory, where
# the epilogue (activation | bias and routing weight) reads it.


def _read_index(sch: s_tir.Schedule, block, buffer_name: str) -> int:
    for i, region in enumerate(sch.get(block).reads):
        if _region_buffer(region).name == buffer_name:
            return i
    raise ValueError(f"{sch.get(block).name_hint} reads no buffer {buffer_name}")


def _threads(cfg: ExpertsConfig, block_n: int) -> tuple[int, int]:
    """(warps, lanes) of a tensor-core thread block."""
    return cfg.block_m // cfg.warp_m * (block_n // cfg.warp_n), 32


# TVM 0.27's CUDA codegen writes a broadcast fp32 x 8 as make_ulonglong4 of eight floats, which does not compile:
# a fill that scales by a routing weight (weight on input: x * w, w the same for the row) vectorizes 4 wide
FP32_BROADCAST = 4


def _reads(sch: s_tir.Schedule, block, buffer_name: str) -> bool:
    return any(_region_buffer(r).name == buffer_name for r in sch.get(block).reads)


def _coop_fetch(sch: s_tir.Schedule, block, warps: int, lanes: int, vec: int) -> None:
    """Spread a shared-memory fill over the thread block: vec contiguous elements per thread."""
    loops = sch.get_loops(block)
    _, ty, tx, v = sch.split(sch.fuse(*loops[-2:]), [None, warps, lanes, vec])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(v)


VECTOR_BYTES = 16  # one 128-bit load or store per thread when filling shared memory


def _loaded_buffer(func, names: tuple[str, ...]):
    """The first buffer named in `names` that `func` loads from (its arguments: num_blocks, w13 | w2)."""
    import tvm_ffi
    from tvm.ir import TensorLoad

    found = []

    def note(load):
        if _region_buffer(load).name in names:
            found.append(_region_buffer(load))
        return load

    tvm_ffi.structural_map(func.body, (TensorLoad, note))
    return found[0]


def _dtype(func) -> str:
    """The weight dtype of an expert kernel."""
    return str(_loaded_buffer(func, ("w13", "w2")).dtype)


def _mma_gemm(sch: s_tir.Schedule, name: str, cfg: ExpertsConfig, block_n: int, dtype: str,
              a_stage: str | None, a_buffer: str):
    """Tensorize block "gemm" (loops tile, block, m, c, k). a_stage: the block that produces A (its
    rows gathered) or None when A is a function argument (`a_buffer`, read in place)."""
    from . import tensor_intrin

    smem = "shared.dyn" if cfg.dynamic_smem else "shared"
    intr = tensor_intrin.names(dtype, smem)
    vec = VECTOR_BYTES // 2  # 16-bit inputs
    frag = tensor_intrin.FRAG
    warps, lanes = _threads(cfg, block_n)
    g = sch.get_sblock("gemm", func_name=name)
    nt, b, m, c, k = sch.get_loops(g)
    sch.bind(nt, "blockIdx.x")  # (_exit_past_blocks rasters the grid: config.group_m)
    sch.bind(b, "blockIdx.y")
    m0, m1, m2 = sch.split(m, [cfg.block_m // cfg.warp_m, cfg.warp_m // frag, frag])
    c0, c1, c2 = sch.split(c, [block_n // cfg.warp_n, cfg.warp_n // frag, frag])
    k0, k1, k2 = sch.split(k, [None, cfg.block_k // frag, frag])
    sch.reorder(m0, c0, k0, k1, m1, c1, m2, c2, k2)
    warp = sch.fuse(m0, c0)
    sch.bind(warp, "threadIdx.y")
    outer = sch.blockize(m2)

    # operands into shared memory, one block_k step at a time
    load_w = sch.get_sblock("load_w", func_name=name)
    if a_stage is not None:
        a_sh = sch.get_sblock(a_stage, func_name=name)
        sch.set_scope(a_sh, 0, smem)
    else:
        a_sh = sch.cache_read(outer, _read_index(sch, outer, a_buffer), smem)
    sch.set_scope(load_w, 0, smem)
    for blk in (a_sh, load_w):
        sch.compute_at(blk, k0)
        sch.storage_align(blk, 0, axis=-2, factor=32, offset=8)  # rows 16 bytes apart: no bank conflicts
        _coop_fetch(sch, blk, warps, lanes, min(vec, FP32_BROADCAST) if _reads(sch, blk, "topk_weights") else vec)

    # fragments into registers per k1 step, accumulator in registers for the whole reduction
    a_w = sch.cache_read(outer, _read_index(sch, outer, _region_buffer(sch.get(a_sh).writes[0]).name), "warp")
    b_w = sch.cache_read(outer, _read_index(sch, outer, _region_buffer(sch.get(load_w).writes[0]).name), "warp")
    for blk in (a_w, b_w):
        sch.compute_at(blk, k1)
    c_w = sch.cache_write(outer, 0, "warp")
    sch.reverse_compute_at(c_w, warp)
    sch.set_scope(c_w, 0, smem)
    sch.decompose_reduction(outer, k0)

    def frag_tiles(blk, rows_first: bool):
        r, col = sch.get_loops(blk)[-2:]
        r0, r1 = sch.split(r, [None, frag])
        c0_, c1_ = sch.split(col, [None, frag])
        sch.reorder(r0, c0_, r1, c1_)
        return r1

    la = frag_tiles(a_w, True)
    lb = frag_tiles(b_w, True)
    ls = frag_tiles(c_w, True)
    sch.transform_layout(a_w, ("write", 0), tensor_intrin.frag_layout_4d)
    sch.transform_layout(b_w, ("write", 0), tensor_intrin.frag_layout_4d)
    sch.transform_layout(c_w, ("read", 0), tensor_intrin.frag_layout_4d)
    sch.tensorize(la, intr["load_a"])
    sch.tensorize(lb, intr["load_b"])
    sch.tensorize(sch.get_loops(g)[-3], intr["compute"])
    sch.tensorize(sch.get_loops(sch.get_sblock("gemm_init", func_name=name))[-2], intr["init"])
    sch.tensorize(ls, intr["store"])
    if cfg.stages > 1:  # the next block_k step's operands load (cp.async) while this one multiplies
        sch.annotate(k0, "software_pipeline_stage", [0, 0, cfg.stages - 1])
        sch.annotate(k0, "software_pipeline_order", [0, 1, 2])
        sch.annotate(k0, "software_pipeline_async_stages", [0])
    return warps, lanes


def _epilogue_threads(sch: s_tir.Schedule, block, warps: int, lanes: int) -> None:
    *_, m, c = sch.get_loops(block)
    _, ty, tx = sch.split(sch.fuse(m, c), [None, warps, lanes])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")


def _region_buffer(region):
    """The buffer a block's read/write region or a load names (TVM 0.27: .source)."""
    return getattr(region, "buffer", None) or region.source


def _exit_past_blocks(sch: s_tir.Schedule, name: str, cfg: ExpertsConfig) -> s_tir.Schedule:
    """Thread blocks past num_blocks (the grid covers every possible block) exit before touching
    memory: their block_expert is -1. Without the sort (cfg.sort false) a block below num_blocks exits
    too when its slot's expert is another EP rank's (block_expert -1). The kernels' predicates
    (kernels.experts._live) do not survive compute_at and blockize onto the staged loads, so the guard
    goes around the whole block body.

    The grid is (blockIdx.x = weight tile, blockIdx.y = sorted block). With config.group_m G > 1 it is
    rastered here, on the finished schedule (a split of the block loop before the tensorize stops it,
    and binding a fused loop after it is refused): blockIdx.x = tile * G + block % G, blockIdx.y =
    block // G, so the G sorted blocks that share a weight tile (consecutive blocks of one expert) are
    neighbours in launch order and read the tile from HBM once; L2 serves the others. The last group
    may pass the last possible block: the guard stops those too."""
    import tvm_ffi
    from tvm.tirx import And, BufferLoad, Cast, For, IfThenElse, IntImm, Var, floordiv, floormod
    from tvm.tirx.op import tvm_thread_invariant

    func = sch.mod[name]
    num_blocks = _loaded_buffer(func, ("num_blocks",))
    block_expert = _loaded_buffer(func, ("block_expert",))
    group = cfg.group_m

    def guarded(body, block):
        # uniform over the thread block: TVM's sync planner must be told, or it refuses the barriers inside
        cond = Cast("int64", block) < Cast("int64", BufferLoad(num_blocks, [0]))
        if not cfg.sort:
            cond = And(cond, BufferLoad(block_expert, [block]) >= IntImm("int32", 0))
        return IfThenElse(tvm_thread_invariant(cond), body, None)

    def tag(stmt):
        return stmt.thread_binding.thread_tag if isinstance(stmt, For) and stmt.thread_binding is not None else None

    def grid(stmt):
        if tag(stmt) != "blockIdx.x":
            return stmt
        inner = stmt.body
        assert tag(inner) == "blockIdx.y", f"{name}: the sorted-block loop is not directly inside the tile loop"
        tile, block = stmt.loop_var, inner.loop_var
        if group == 1:
            body = guarded(inner.body, block)
            return For(tile, stmt.min, stmt.extent, stmt.kind,
                       For(block, inner.min, inner.extent, inner.kind, body, inner.thread_binding, inner.annotations),
                       stmt.thread_binding, stmt.annotations)
        g = IntImm(str(block.ty), group)
        sorted_block = block * g + floormod(tile, g)
        uses = {tile: floordiv(tile, g), block: sorted_block}

        def use(var):
            return next((e for v, e in uses.items() if var.same_as(v)), var)

        body = guarded(tvm_ffi.structural_map(inner.body, (Var, use)), sorted_block)
        rows = For(block, inner.min, floordiv(inner.extent + g - 1, g), inner.kind, body, inner.thread_binding,
                   inner.annotations)
        return For(tile, stmt.min, stmt.extent * g, stmt.kind, rows, stmt.thread_binding, stmt.annotations)

    return _schedule(func.with_body(tvm_ffi.structural_map(func.body, (For, grid))), name)


# ---- decode with 16-byte loads (cfg.vector_loads) -----------------------------------------------


def _vector(func) -> int:
    """Weight elements per 16-byte load in an expert kernel."""
    return VECTOR_BYTES * 8 // tvm.runtime.DataType(_dtype(func)).bits


def _split_k_vector_gemm(sch: s_tir.Schedule, name: str, cfg: ExpertsConfig, block_n: int, vec: int,
                         epilogue: str, prefetch: bool = False) -> None:
    """Decode (one row per block): thread (ty, tx) sums a contiguous 1/split_k of the reduction for
    `vec` adjacent columns, one 16-byte load per k step, so (BN / vec) x split_k threads keep 16 bytes
    each in flight; the split_k partial rows meet in shared memory, where one thread per column adds
    them up, and the epilogue reads the sums with the same threads. (Kernels built with int64_loops.)
    prefetch (config.decode_prefetch): the weight batches double-buffered, batch j + 1 issued before
    batch j is summed."""
    g = sch.get_sblock("gemm", func_name=name)
    nt, b, m, c, r = sch.get_loops(g)
    ry, rr = sch.split(r, [cfg.split_k, None])
    rf = sch.rfactor(ry, 0)  # partial[ry, .., c]: the sum over one thread's k range
    sch.compute_at(rf, b)  # into the thread block of the final sum and the epilogue
    sch.set_scope(rf, 0, "shared")
    sch.bind(nt, "blockIdx.x")
    sch.bind(b, "blockIdx.y")
    ry_, c_, rr_ = sch.get_loops(rf)[2:]  # compute_at leaves: the k range, the columns, the k steps
    cx_, cv_ = sch.split(c_, [None, vec])
    sch.reorder(ry_, cx_, rr_, cv_)
    sch.bind(ry_, "threadIdx.y")
    sch.bind(cx_, "threadIdx.x")
    acc = sch.cache_write(rf, 0, "local")  # the running sums stay in registers
    sch.reverse_compute_at(acc, cx_)
    sch.vectorize(cv_)  # before decompose_reduction (shared/TVM-NOTES.md)
    init = sch.decompose_reduction(rf, rr_)
    sch.unroll(sch.get_loops(init)[-1])  # a vectorized fp32 x 8 zero does not compile (TVM's CUDA codegen)
    steps = int(sch.get(rr_).extent)
    unroll = fit_divisor(steps, cfg.decode_unroll)
    if unroll > 1:
        # `unroll` k steps per iteration, their weights first copied to registers: the 16-byte loads all
        # issue before the first sum waits on one (ptxas, left to interleave them, keeps about two in flight)
        ro, ri = sch.split(rr_, [steps // unroll, unroll])
        weight = _loaded_buffer(sch.mod[name], ("w13", "w2")).name
        cache = sch.cache_read(rf, _read_index(sch, rf, weight), "local")
        sch.compute_at(cache, ro)
        *_, ck, cv = sch.get_loops(cache)
        sch.vectorize(cv)
        sch.unroll(ck)
        sch.unroll(ri)
        if prefetch and steps // unroll > 1:
            # batch j + 1's copy (stage 0) before batch j's sums (stage 1), into a second register buffer;
            # unrolled, so each buffer is named by a constant index (registers, not local memory)
            sch.annotate(ro, "software_pipeline_stage", [0, 1])
            sch.annotate(ro, "software_pipeline_order", [0, 1])
            sch.unroll(ro)
    ty_n, tx_n = cfg.split_k, block_n // vec
    *cols, ry2 = sch.get_loops(g)[2:]  # (the row: one), the columns, the k ranges
    _, ty, tx = sch.split(sch.fuse(*cols), [None, ty_n, tx_n])  # threads past BN idle
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.set_scope(g, 0, "shared")  # the column sums, for the epilogue's threads
    total = sch.cache_write(g, 0, "local")
    sch.reverse_compute_at(total, tx)
    sch.decompose_reduction(g, ry2)
    ep = sch.get_sblock(epilogue, func_name=name)
    _, ety, etx = sch.split(sch.fuse(*sch.get_loops(ep)[2:]), [None, ty_n, tx_n])
    sch.bind(ety, "threadIdx.y")
    sch.bind(etx, "threadIdx.x")


def _wait_after_first_weights(sch: s_tir.Schedule, name: str) -> s_tir.Schedule:
    """The decode down GEMV (vector_loads) copies its first batch of weights to registers before it
    waits for the up GEMV's grid: the weights and the block's expert (block_expert, written by
    route_dispatch, which finished before the up GEMV's blocks passed their own wait and let this grid
    launch) do not depend on the up GEMV; act, the only input it writes, is read after the wait. So the
    first loads overlap the up GEMV's last blocks instead of starting after them (H100, docs/perf.md,
    session 9: 1-3 us a one-token layer). The wait goes between the weight copy and the sums of the
    first batch (with decode_prefetch, the copy of the second batch also comes before it); a kernel
    without the copy (decode_unroll fitted to 1) keeps its wait at entry."""
    import tvm_ffi
    from tvm.s_tir import SBlockRealize
    from tvm.script import tirx as T
    from tvm.tirx import Evaluate, For, IfThenElse, IntImm, SeqStmt

    func = sch.mod[name]
    copy = f"{_loaded_buffer(func, ('w2',)).name}_local"
    found: list = []
    loops: list = []

    def on_for(node, visitor):
        loops.append(node)
        visitor.default_visit(node)
        loops.pop()

    def on_realize(node, visitor):
        if node.block.name_hint == copy:
            found.append(list(loops))
        visitor.default_visit(node)

    tvm_ffi.structural_visit(func.body, [(For, on_for), (SBlockRealize, on_realize)])
    if not found:
        return sch
    (stack,) = found
    batch = stack[-3]  # the batch loop, around the copy's (rows, vector) loops
    body = batch.body
    assert isinstance(body, SeqStmt) and len(body.seq) == 2 and body.seq[0].same_as(stack[-2]), \
        f"{name}: the batch loop is not (weight copy, sums) as _split_k_vector_gemm makes it"
    first = batch.loop_var == IntImm(str(batch.loop_var.ty), 0)
    wait = IfThenElse(first, Evaluate(T.call_extern("void", GRID_WAIT)), None)

    def insert(stmt):
        if not stmt.loop_var.same_as(batch.loop_var):
            return stmt
        ann = dict(stmt.annotations)
        if "software_pipeline_stage" in ann:  # decode_prefetch: (copy, sums) -> (copy, wait, sums), the wait a sum
            copy_stage, sums_stage = (int(v) for v in ann["software_pipeline_stage"])
            ann["software_pipeline_stage"] = [copy_stage, sums_stage, sums_stage]
            ann["software_pipeline_order"] = [0, 1, 2]
        return For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, SeqStmt([body.seq[0], wait, body.seq[1]]),
                   stmt.thread_binding, ann)

    return _schedule(func.with_body(tvm_ffi.structural_map(func.body, (For, insert))), name)


# ---- weight packing (kernels/pack.py) ------------------------------------------------------------


def pack(func, name: str, cfg: PackConfig) -> s_tir.Schedule:
    """A transpose without shared memory: thread (kx, cx) loads a V x V block of the source (V source
    rows, one 16-byte load of V contiguous k each), transposes it in registers and stores V output
    rows (one 16-byte store of V contiguous columns each). Lanes run along k first, so a warp's loads
    cover tile_k contiguous elements of several source rows (bf16, tile_k 64: 4 x 128 bytes) and its
    stores V-column pieces of several output rows (8 x 64 bytes): every 32-byte sector is used whole on
    both sides, with no shared-memory traffic, bank conflicts or barriers (a shared tile read by
    16-byte vectors on both sides cannot be padded free of conflicts). One thread block per (expert,
    tile, k tile, half, column tile); halves and column tiles fastest, so neighbouring blocks fill the
    same output rows."""
    from .cpu import pack_block

    sch = _schedule(func, name)
    blk, tiles = pack_block(sch, name, cfg)
    v = tiles.vector
    e, s, t, k, c = sch.get_loops(blk)
    ko, kx, kv = sch.split(k, [None, tiles.tile_k // v, v])
    co, cx, cv = sch.split(c, [None, tiles.tile_n // v, v])
    sch.reorder(e, t, ko, s, co, cx, kx, kv, cv)
    grid = sch.fuse(e, t, ko, s, co)
    assert int(sch.get(grid).extent) < 2 ** 31, f"{name}: {sch.get(grid).extent} thread blocks"
    sch.bind(grid, "blockIdx.x")
    sch.bind(cx, "threadIdx.y")
    sch.bind(kx, "threadIdx.x")
    src = sch.cache_read(blk, 0, "local")  # V source rows x V contiguous k
    sch.compute_at(src, kx)
    rows, ks = sch.get_loops(src)[-2:]
    sch.unroll(rows)
    sch.vectorize(ks)
    dst = sch.cache_write(blk, 0, "local")  # V output rows x V contiguous columns
    sch.reverse_compute_at(dst, kx)
    rows, cols = sch.get_loops(dst)[-2:]
    sch.unroll(rows)
    sch.vectorize(cols)
    # the transpose itself: register moves (TVM's CUDA codegen cannot build a strided bf16 vector)
    sch.unroll(kv)
    sch.unroll(cv)
    return sch
