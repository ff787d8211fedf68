"""Schedule configs as data: frozen dataclasses, read from schedules/*.yaml, checked by one predicate.

Shape legend: T tokens, K top-k, Hp padded hidden, Hx the up GEMMs' reduction (x's columns), I intermediate
per rank, N13 = 2I | I.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..kernels import VECTOR_BYTES, vector_elems
from ..kernels.experts import ExpertShapes

SCHEDULES_DIR = Path(__file__).resolve().parents[2] / "schedules"


@dataclass(frozen=True)
class ExpertsConfig:
    block_m: int  # rows per block of the sorted order
    block_n_up: int  # columns per w13 tile (gated: gate half + up half)
    block_n_down: int  # columns per w2 tile
    combine_n: int  # columns per combine tile
    gather_rows: bool = True  # stage each block's input rows in fp32 before the up GEMM
    grid_blocks: bool = False  # loop over every possible block (predicated): a GPU binds them to the grid
    split_k: int = 1  # GPU: threads (threadIdx.y) sharing one column's reduction
    dispatch_threads: int = 0  # GPU: threads of the one-block dispatch (0: the serial dispatch)
    # GPU: slots per thread block of the multi-block dispatch (kernels.dispatch.dispatch_tiles_funcs:
    # count, scan and place kernels, dispatch_threads threads each); 0: the one-block dispatch
    dispatch_tile: int = 0
    # GPU tensor cores (mma.sync m16n8k16): each warp computes a warp_m x warp_n piece of the BM x BN
    # tile, (BM / warp_m) * (BN / warp_n) warps per block, reduction in steps of block_k through shared
    mma: bool = False
    block_k: int = 32
    warp_m: int = 16
    warp_n: int = 32
    stages: int = 1  # mma: shared-memory buffers of the operands (> 1: cp.async software pipeline)
    # mma: operands and accumulator tile in dynamic shared memory, which may pass the 48 KiB of static
    # shared memory (up to MMA_DYNAMIC_SHARED_BYTES): taller tiles, more pipeline stages
    dynamic_smem: bool = False
    # mma: sorted blocks per raster group. The grid runs group_m consecutive sorted blocks of one weight
    # tile before the next tile (blockIdx.x = tile * group_m + block % group_m), so the blocks of an
    # expert that share a weight tile run together and read it from HBM once (L2 serves the others);
    # 1: every tile of one block before the next block (each block of an expert re-reads its weights)
    group_m: int = 1
    # GPU decode (block_m 1, split_k > 1): each thread loads 16 bytes of weight columns per k step,
    # (BN / vector) x split_k threads per block
    vector_loads: bool = False
    # vector_loads: k steps a thread unrolls (its 16-byte loads in flight together; fitted down to a
    # divisor of each GEMM's steps per thread). 1: one load in flight per thread, as before session 7
    decode_unroll: int = 1
    # vector_loads: the decode GEMVs ("up", "down", "both"; "none") that double-buffer their batches of
    # decode_unroll weight loads: batch j + 1 is issued before batch j is summed (TVM's software pipeline on
    # the batch loop, unrolled), so a thread's loads stay in flight while it sums. Twice the registers for
    # the loads, which may leave one block per multiprocessor where two fitted. No effect on a GEMV whose
    # unroll fits to 1 or to all its steps (one batch)
    decode_prefetch: str = "none"
    # fused: the k steps of the GEMVs' threads interleaved (up: thread j of split_k takes rows j, j + split_k,
    # ...), so a block's loads of one batch cover contiguous rows; false: each thread a contiguous range.
    # (The unfused decode GEMVs cannot: TVM's cache_read of a strided region copies the wrong rows.)
    decode_interleave: bool = False
    # fused: each block routes its token itself (the rank routing of route_dispatch, a thread per expert), so
    # no route_dispatch kernel runs before it
    fused_routing: bool = False
    # no sort (block_m 1, grid_blocks): slot s is block s, routing writes the dispatch buffers itself
    # (kernels/routing.py route_dispatch) and no dispatch kernel runs; blocks of another EP rank's
    # experts exit at once. Each slot streams its expert's weights: for paths with well under one row
    # per expert, where slots rarely share an expert.
    sort: bool = True
    # the down GEMM stores its weighted rows (the scratch y [MP, Hp] that combine sums over top-k) in the
    # model dtype instead of fp32: half the scratch bytes written and read, one more rounding per slot
    # (as vLLM's fused MoE, whose intermediate_cache3 is in the model dtype); the K-sum stays fp32
    y_model_dtype: bool = False
    # Hopper tensor cores (sm_90a, with mma): each warpgroup (128 threads) computes 64 rows x BN of the
    # tile with wgmma from swizzled shared memory, the fp32 accumulator and the epilogue in registers;
    # the operands stream through a ring of `stages` cp.async buffers of BK = 64 (kernels/experts_wgmma.py).
    # block_m: a multiple of 64 (block_m / 64 warpgroups); block_n_*: multiples of 64, at most 256;
    # warp_m, warp_n, block_k and dynamic_smem are the mma.sync fallback's (fit_config)
    wgmma: bool = False
    # wgmma: packed weight tiles per thread block (block_n * wgmma_span columns per MMA, at most 256), so a
    # narrow layout (fast decode paths) still takes wide MMAs at many tokens
    wgmma_span: int = 1
    # wgmma: warp-specialised and persistent. A producer warpgroup fills the ring (cp.async signalling
    # full/empty mbarriers) while the block_m / 64 consumer warpgroups run the MMAs and the epilogue; one
    # block per multiprocessor loops over the tiles, so the next tile's loads overlap this one's epilogue
    warp_specialized: bool = False
    # wgmma, classic loop (not warp_specialized): the epilogue stages the block's 16-bit outputs in the
    # ring, then stores whole rows in 16-byte chunks (kernels/experts_wgmma.py, WgmmaTile.staged_store);
    # a down GEMM with an fp32 y (y_model_dtype false) stores from the registers still
    wgmma_staged_store: bool = False
    # GPU: adjacent columns per combine thread (one 16-byte load per row of the K-sum at 8 x 16 bits);
    # combine_n / combine_vector threads per block
    combine_vector: int = 1
    # GPU decode (vector_loads, sort false): the up GEMV, activation, down GEMV and the sum over top-k in
    # one kernel (kernels/experts_fused.py): block (w13 tile, slot) takes its intermediates end to end and
    # adds its weighted share of the slot's output into an fp32 sum with atomics; the last block to finish
    # writes the output. No act or y scratch, no combine kernel. split_k and decode_unroll as vector_loads'
    # (the up GEMV's split and the loads in flight per thread); block_n_up / block_n_down: the packed tiles
    fused: bool = False


@dataclass(frozen=True)
class PathConfig:
    """One path through the layer (decode, prefill): the runner picks it by token count."""

    name: str
    max_rows_per_expert: float | None  # serves T*K/El <= this (rows per local expert); None: any
    experts: ExpertsConfig


@dataclass(frozen=True)
class PackConfig:
    """The weight-packing kernels (kernels/pack.py, run once at load): a transpose of (column, k) tiles.
    Each thread moves a V x V block, V = vector_bytes / element size: V loads of V contiguous k, V
    stores of V contiguous columns, the transpose in registers between them."""

    tile_k: int  # k (Hp | I) per thread block: tile_k / V threads along k (threadIdx.x, lanes run along k first)
    tile_n: int  # output columns per thread block (at most one half-tile W = BN / S)
    vector_bytes: int = 16  # bytes per load and per store of a thread (16: one 128-bit access)


PACK_MAX_THREADS = 1024  # threads per thread block


@dataclass(frozen=True)
class PackTiles:
    """A PackConfig fitted to one pack function's widths: what its schedule uses."""

    vector: int  # V elements per access
    tile_k: int  # a multiple of V dividing the reduction width R
    tile_n: int  # a multiple of V dividing the half-tile width W

    @property
    def threads(self) -> int:
        return (self.tile_k // self.vector) * (self.tile_n // self.vector)


def pack_config_ok(cfg: PackConfig) -> str | None:
    """None when `cfg` can schedule the pack kernels (after fit_pack), else why not."""
    for field in ("tile_k", "tile_n", "vector_bytes"):
        v = getattr(cfg, field)
        if v < 1 or v & (v - 1):
            return f"pack: {field} {v} must be a power of two"
    if cfg.vector_bytes > 16:
        return f"pack: vector_bytes {cfg.vector_bytes} > 16 (the widest access of a thread)"
    return None


def fit_pack(cfg: PackConfig, element_bytes: int, reduction: int, width: int) -> PackTiles:
    """`cfg` fitted to a pack function: R = `reduction` (Hp | I), W = `width` columns per half-tile.
    V shrinks (halving) until it divides R and W; tiles shrink to multiples of V dividing R and W, and
    tile_k further until a thread block has at most PACK_MAX_THREADS threads."""
    why = pack_config_ok(cfg)
    assert why is None, why
    v = max(1, cfg.vector_bytes // element_bytes)
    while reduction % v or width % v:
        v //= 2
    tk, tn = fit_divisor(reduction, max(cfg.tile_k, v), v), fit_divisor(width, max(cfg.tile_n, v), v)
    while (tk // v) * (tn // v) > PACK_MAX_THREADS and tk > v:
        tk = fit_divisor(reduction, tk // 2, v)
    while (tk // v) * (tn // v) > PACK_MAX_THREADS:
        tn = fit_divisor(width, tn // 2, v)
    return PackTiles(v, tk, tn)


def config_ok(cfg: ExpertsConfig, shapes: ExpertShapes) -> str | None:
    """None when `cfg` can schedule `shapes`, else why not. Every caller (build, tuner) uses this."""
    if cfg.block_m < 1:
        return f"block_m {cfg.block_m} < 1"
    if shapes.gated and cfg.block_n_up % 2:
        return f"block_n_up {cfg.block_n_up} must be even for a gated activation"
    if shapes.n13 % cfg.block_n_up:
        return f"block_n_up {cfg.block_n_up} does not divide N13 {shapes.n13}"
    if shapes.hidden % cfg.block_n_down:
        return f"block_n_down {cfg.block_n_down} does not divide Hp {shapes.hidden}"
    if shapes.hx % cfg.split_k or shapes.intermediate % cfg.split_k:
        return f"split_k {cfg.split_k} does not divide Hx {shapes.hx} and I {shapes.intermediate}"
    if shapes.hidden % cfg.combine_n:
        return f"combine_n {cfg.combine_n} does not divide Hp {shapes.hidden}"
    if cfg.combine_vector < 1 or cfg.combine_n % cfg.combine_vector:
        return f"combine_vector {cfg.combine_vector} does not divide combine_n {cfg.combine_n}"
    if not cfg.sort and (cfg.block_m != 1 or not cfg.grid_blocks):
        return f"sort false needs block_m 1 and grid_blocks true, not block_m {cfg.block_m} grid_blocks {cfg.grid_blocks}"
    if cfg.dispatch_tile:
        th = cfg.dispatch_threads
        if th < 32 or th & (th - 1) or cfg.dispatch_tile % th:  # (so a multiple of the scan's unroll, 8)
            return (f"dispatch_tile {cfg.dispatch_tile} must be a multiple of dispatch_threads, a power of two "
                    f">= 32 (not {th})")
    if cfg.decode_prefetch not in DECODE_PREFETCH:
        return f"decode_prefetch {cfg.decode_prefetch!r}: allowed {' | '.join(DECODE_PREFETCH)}"
    if cfg.group_m != 1 and not cfg.mma:
        return f"group_m {cfg.group_m} needs mma (CUDA-core tiles keep one block per row of the grid)"
    if cfg.wgmma and not cfg.mma:
        return "wgmma needs mma true (it is the Hopper form of the tensor-core path)"
    if cfg.wgmma:
        return _wgmma_ok(cfg, shapes)
    if cfg.mma:
        return _mma_ok(cfg, shapes)
    if cfg.fused and (not cfg.vector_loads or cfg.sort):
        return "fused needs vector_loads true and sort false (the decode path)"
    if cfg.fused_routing and not cfg.fused:
        return "fused_routing needs fused true"
    if cfg.decode_interleave and not cfg.fused:
        return "decode_interleave needs fused true (the unfused decode GEMVs split the reduction in ranges)"
    if cfg.vector_loads:
        return _vector_ok(cfg, shapes) or (_fused_ok(cfg, shapes) if cfg.fused else None)
    return None


def fused_tile(cfg: ExpertsConfig, vector_red: bool = False):
    """The fused decode kernel's tile (kernels.experts_fused.FusedTile) of a config."""
    from ..kernels.experts_fused import FusedTile

    return FusedTile(cfg.block_n_up, cfg.block_n_down, cfg.split_k, cfg.decode_unroll, vector_red, cfg.decode_prefetch,
                     cfg.decode_interleave)


def _fused_ok(cfg: ExpertsConfig, shapes: ExpertShapes) -> str | None:
    from ..kernels.experts_fused import fused_tile_ok

    why = fused_tile_ok(shapes, fused_tile(cfg))
    return None if why is None else f"fused: {why}"


MMA_FRAG = 16  # rows, columns and k of one tensor-core fragment (moegen.schedule.tensor_intrin)
MMA_SKEW = 8  # elements of padding per shared-memory row (schedule.cuda storage_align)
MMA_SHARED_BYTES = 48 * 1024  # static shared memory per thread block
# dynamic shared memory per thread block on the least of the CUDA targets (sm_80: 163 KiB; sm_90: 227)
MMA_DYNAMIC_SHARED_BYTES = 163 * 1024


def _mma_ok(cfg: ExpertsConfig, shapes: ExpertShapes) -> str | None:
    if shapes.dtype not in ("float16", "bfloat16"):
        return f"mma needs float16 or bfloat16 weights, not {shapes.dtype}"
    why = _mma_tile_ok(cfg)
    if why is not None:
        return why
    for what, k in (("Hx", shapes.hx), ("I", shapes.intermediate)):
        if k % cfg.block_k:
            return f"mma: block_k {cfg.block_k} does not divide {what} {k}"
    return None


def _mma_tile_ok(cfg: ExpertsConfig) -> str | None:
    """What makes an mma config wrong whatever the layer: fit_config only shrinks widths, so a tile that
    already overflows shared memory, say, must be refused rather than fall back to CUDA cores."""
    if cfg.stages < 1:
        return f"mma: stages {cfg.stages} < 1"
    if cfg.group_m < 1:
        return f"mma: group_m {cfg.group_m} < 1"
    for field in ("block_m", "block_k", "warp_m", "warp_n"):
        if getattr(cfg, field) % MMA_FRAG:
            return f"mma: {field} {getattr(cfg, field)} is not a multiple of {MMA_FRAG}"
    if cfg.block_m % cfg.warp_m:
        return f"mma: warp_m {cfg.warp_m} does not divide block_m {cfg.block_m}"
    for field, n in (("block_n_up", cfg.block_n_up), ("block_n_down", cfg.block_n_down)):
        if n % cfg.warp_n:
            return f"mma: warp_n {cfg.warp_n} does not divide {field} {n}"
    for field, n in (("block_n_up", cfg.block_n_up), ("block_n_down", cfg.block_n_down)):
        smem = cfg.block_m * n * 4 + cfg.stages * (cfg.block_m + n) * (cfg.block_k + MMA_SKEW) * 2  # fp32 tile + operands
        most = MMA_DYNAMIC_SHARED_BYTES if cfg.dynamic_smem else MMA_SHARED_BYTES
        if smem > most:
            return (f"mma: block_m {cfg.block_m} x {field} {n} needs {smem} bytes of shared memory "
                    f"(at most {most}{'' if cfg.dynamic_smem else ' static; dynamic_smem allows more'})")
    return None


WGMMA_SHARED_BYTES = 227 * 1024  # dynamic shared memory per thread block on sm_90
SM_REGISTERS = 65536  # 32-bit registers per multiprocessor (a wgmma or decode block may take them all)
WGMMA_OTHER_REGISTERS = 40  # what a thread needs besides its accumulators (addresses, epilogue)


def _wgmma_ok(cfg: ExpertsConfig, shapes: ExpertShapes) -> str | None:
    from ..kernels.experts_wgmma import ATOM_COLS, BK, WG_ROWS, WgmmaTile

    if shapes.dtype not in ("float16", "bfloat16"):
        return f"wgmma needs float16 or bfloat16 weights, not {shapes.dtype}"
    if shapes.weight_on_input:
        return "wgmma: the routing weight on the input is applied by the mma.sync kernels only"
    if not cfg.sort or not cfg.grid_blocks:
        return "wgmma needs sort true and grid_blocks true"
    if cfg.stages < 3:
        return f"wgmma: stages {cfg.stages} < 3 (the operand ring: loads two steps behind, one MMA step in flight)"
    if cfg.group_m < 1:
        return f"wgmma: group_m {cfg.group_m} < 1"
    if cfg.block_m % WG_ROWS:
        return f"wgmma: block_m {cfg.block_m} is not a multiple of {WG_ROWS} (rows per warpgroup)"
    if cfg.wgmma_span < 1:
        return f"wgmma: wgmma_span {cfg.wgmma_span} < 1"
    if cfg.wgmma_staged_store and cfg.warp_specialized:
        return "wgmma: wgmma_staged_store needs the classic loop (warp_specialized false): the producer refills the ring during the epilogue"
    for field, n, cols in (("block_n_up", cfg.block_n_up, shapes.n13), ("block_n_down", cfg.block_n_down, shapes.hidden)):
        if n % ATOM_COLS or n * cfg.wgmma_span > 256:
            return f"wgmma: {field} {n} x wgmma_span {cfg.wgmma_span} must be a multiple of {ATOM_COLS} and at most 256"
        if field == "block_n_up" and shapes.gated and shapes.intermediate % (n // 2):
            return f"wgmma: half of block_n_up {n} does not divide I {shapes.intermediate} (gate and up halves)"
        if cols % (n * cfg.wgmma_span):
            return f"wgmma: {field} {n} x wgmma_span {cfg.wgmma_span} does not divide the {cols} columns"
        tile = WgmmaTile(cfg.block_m, n, cfg.stages, span=cfg.wgmma_span, producer=cfg.warp_specialized)
        if tile.smem_bytes > WGMMA_SHARED_BYTES:
            return (f"wgmma: {cfg.stages} stages of block_m {cfg.block_m} x {field} {n} x wgmma_span "
                    f"{cfg.wgmma_span} need {tile.smem_bytes} bytes of shared memory (at most {WGMMA_SHARED_BYTES})")
        if tile.threads * (tile.mma_n // 2 + WGMMA_OTHER_REGISTERS) > SM_REGISTERS:
            return (f"wgmma: {tile.threads} threads holding {tile.mma_n // 2} accumulators each (block_m "
                    f"{cfg.block_m}, {field} {n} x wgmma_span {cfg.wgmma_span}) pass the {SM_REGISTERS} registers "
                    f"of a multiprocessor")
    for what, k in (("Hx", shapes.hx), ("I", shapes.intermediate)):
        if k % BK:
            return f"wgmma: its reduction step {BK} does not divide {what} {k}"
    return None


DECODE_PREFETCH = ("none", "up", "down", "both")  # ExpertsConfig.decode_prefetch


def prefetches(cfg: ExpertsConfig, gemm: str) -> bool:
    """Whether the decode GEMV `gemm` ("up" | "down") double-buffers its weight batches."""
    return cfg.decode_prefetch in (gemm, "both")


DECODE_UNROLL_MAX = 16  # 16-byte loads in flight per decode thread (4 registers each)
DECODE_OTHER_REGISTERS = 24  # what a decode thread needs besides its loads (8 sums, addresses; ptxas: 52 at unroll 8)


def _vector_ok(cfg: ExpertsConfig, shapes: ExpertShapes) -> str | None:
    vec = vector_elems(shapes.dtype)
    if cfg.block_m != 1 or cfg.split_k < 2:
        return f"vector_loads needs block_m 1 and split_k > 1, not block_m {cfg.block_m} split_k {cfg.split_k}"
    if not 1 <= cfg.decode_unroll <= DECODE_UNROLL_MAX:
        return f"vector_loads: decode_unroll {cfg.decode_unroll} must be 1 to {DECODE_UNROLL_MAX} k steps"
    for gemm, field, n in (("up", "block_n_up", cfg.block_n_up), ("down", "block_n_down", cfg.block_n_down)):
        if n % vec or (n // vec) * cfg.split_k > 1024:
            return f"vector_loads: {field} {n} must be a multiple of {vec}, with ({n} / {vec}) * split_k <= 1024 threads"
        batches = 2 if prefetches(cfg, gemm) else 1  # decode_prefetch: a second buffer
        threads = (n // vec) * cfg.split_k
        regs = batches * cfg.decode_unroll * VECTOR_BYTES // 4 + DECODE_OTHER_REGISTERS
        if threads * regs > SM_REGISTERS:
            return (f"vector_loads: {batches} x decode_unroll {cfg.decode_unroll} x 16 bytes in registers for each of "
                    f"{threads} threads ({field} {n}, split_k {cfg.split_k}) pass the {SM_REGISTERS} registers of a "
                    f"multiprocessor")
    return None


def target_ok(cfg: ExpertsConfig, target) -> str | None:
    """What a config asks of the target's GPU beyond config_ok, or None: wgmma is a Hopper instruction
    (targets/cuda-sm90.yaml: wgmma: true)."""
    if cfg.wgmma and not target.extra.get("wgmma"):
        return f"wgmma: true needs a Hopper target (cuda-sm90), not {target.name}"
    if cfg.fused and target.family != "cuda":
        return f"fused: true needs a CUDA target (its sum over top-k is in atomics), not {target.name}"
    if target.family == "cuda" and not (cfg.mma or cfg.vector_loads) and cfg.split_k > 1:
        # a CUDA-core split-K tile: a thread per column and k split (schedule.cuda._tile_gemm); a vector decode
        # config fitted off its vectors lands here, e.g. split_k 64 of 128 columns: 8192 threads, refused at launch
        threads = max(cfg.block_n_up, cfg.block_n_down) * cfg.split_k
        if threads > CUDA_MAX_THREADS:
            return (f"split_k {cfg.split_k} x block_n {max(cfg.block_n_up, cfg.block_n_down)}: {threads} threads a "
                    f"block on CUDA cores (vector_loads off), more than {CUDA_MAX_THREADS}")
    return None


CUDA_MAX_THREADS = 1024  # threads per thread block


def fit_divisor(n: int, want: int, step: int = 1) -> int:
    """Largest multiple of `step` <= want that divides n (at least `step`)."""
    for d in range(want - want % step, step - 1, -step):
        if n % d == 0:
            return d
    return step


def _fit_combine(cfg: ExpertsConfig, shapes: ExpertShapes) -> dict:
    """combine_n: a divisor of Hp; combine_vector: the largest power of two up to the asked one that
    divides it (a vector of whole 2-, 4-, 8- or 16-byte loads)."""
    n = fit_divisor(shapes.hidden, cfg.combine_n)
    v = 1 << (max(cfg.combine_vector, 1).bit_length() - 1)
    while n % v:
        v //= 2
    return {"combine_n": n, "combine_vector": v}


def fit_config(cfg: ExpertsConfig, shapes: ExpertShapes) -> ExpertsConfig:
    """The tuned config shrunk to divisors of this layer's widths (irregular test sizes need it)."""
    wgmma_asked = cfg.wgmma  # its stages and widths are wgmma's: as an mma.sync tile they may not fit
    if cfg.wgmma:
        fitted = _fit_wgmma(cfg, shapes)
        if config_ok(fitted, shapes) is None:
            return fitted
        cfg = dataclasses.replace(cfg, wgmma=False)  # widths, dtype or options wgmma cannot take: mma.sync
    step = 2 if shapes.gated else 1
    fitted = dataclasses.replace(
        cfg,
        block_n_up=fit_divisor(shapes.n13, cfg.block_n_up, step) if shapes.gated else fit_divisor(shapes.n13, cfg.block_n_up),
        block_n_down=fit_divisor(shapes.hidden, cfg.block_n_down),
        **_fit_combine(cfg, shapes),
    )
    if fitted.vector_loads:
        # a parallelism knob there (up to 64): a divisor of both reductions that leaves every thread at
        # least two k steps (a unit loop would vanish from the schedule)
        g = math.gcd(shapes.hx, shapes.intermediate)
        fitted = dataclasses.replace(fitted, split_k=fit_divisor(g, max(1, min(cfg.split_k, g // 2))))
    if shapes.gated and (shapes.n13 // 2) % (fitted.block_n_up // 2):
        fitted = dataclasses.replace(fitted, block_n_up=2 * fit_divisor(shapes.intermediate, cfg.block_n_up // 2))
    if fitted.vector_loads and not fitted.sort and shapes.weight_on_input:
        # the unfused decode GEMV would broadcast x * w as fp32 x 8, which TVM's CUDA codegen cannot write
        # (schedule.cuda.FP32_BROADCAST): the fused kernel stages x * w in shared memory instead
        fitted = dataclasses.replace(fitted, fused=True)
    if fitted.fused:  # loads in flight: a divisor of the up GEMV's rows per thread and of a tile's intermediates
        from ..kernels.experts_fused import tile_intermediates

        fitted = dataclasses.replace(fitted, decode_unroll=fit_divisor(
            math.gcd(shapes.hx // fitted.split_k, tile_intermediates(shapes, fitted.block_n_up)), fitted.decode_unroll))
        if config_ok(fitted, shapes) is not None:
            fitted = dataclasses.replace(fitted, fused=False, decode_interleave=False,  # widths it cannot take: unfused
                                         fused_routing=False)
    if fitted.vector_loads and config_ok(fitted, shapes) is not None:
        fitted = dataclasses.replace(fitted, vector_loads=False, fused=False,  # widths that do not split into vectors
                                     decode_interleave=False, fused_routing=False)
    if fitted.mma:
        # the reduction step: a multiple of two fragments dividing both reductions (gpt-oss-20b's I 2880
        # takes no block_k 128: 96 keeps the tensor cores, where the fallback below measured 50 ms);
        # at least two fragments, as in every build verified on the H100 (block_k 16 never ran there)
        g, step = math.gcd(shapes.hx, shapes.intermediate), 2 * MMA_FRAG
        if g % step == 0:
            fitted = dataclasses.replace(fitted, block_k=fit_divisor(g, max(cfg.block_k, step), step))
    if fitted.mma and (wgmma_asked or _mma_tile_ok(cfg) is None) and config_ok(fitted, shapes) is not None:
        # widths or dtype tensor cores cannot tile (irregular test sizes, fp32): CUDA-core arithmetic.
        # An mma.sync tile wrong for any layer is not replaced: config_ok names it (a DeepSeek-V3 tile
        # with two stages past 48 KiB of static shared memory ran 58x slower on CUDA cores: H100 run 76)
        fitted = dataclasses.replace(fitted, mma=False, group_m=1)
    why = config_ok(fitted, shapes)
    assert why is None, why
    return fitted


def _fit_wgmma(cfg: ExpertsConfig, shapes: ExpertShapes) -> ExpertsConfig:
    """Tile widths in whole 64-column swizzle atoms (gpt-oss-20b's Hp 2880: 64 or 192, not 128); a gated
    tile's halves divide I; wgmma_span down to what both GEMMs' columns divide."""
    from ..kernels.experts_wgmma import ATOM_COLS

    up = (2 * fit_divisor(shapes.intermediate, cfg.block_n_up // 2, ATOM_COLS // 2) if shapes.gated
          else fit_divisor(shapes.n13, cfg.block_n_up, ATOM_COLS))
    down = fit_divisor(shapes.hidden, cfg.block_n_down, ATOM_COLS)
    span = next(sp for sp in range(cfg.wgmma_span, 0, -1)  # packed tiles per block that still tile both GEMMs
                if sp == 1 or (max(up, down) * sp <= 256 and shapes.n13 % (up * sp) == 0
                               and shapes.hidden % (down * sp) == 0))
    return dataclasses.replace(cfg, block_n_up=up, block_n_down=down, wgmma_span=span, **_fit_combine(cfg, shapes))


class ScheduleError(ValueError):
    """A schedules file that cannot be used: one line naming the file, the field and what is allowed."""


def shape_key(shapes: ExpertShapes) -> str:
    """The name of a layer shape's own schedules file (moegen.spec.shape_key)."""
    from ..spec import shape_key as key

    return key(shapes.local_experts, shapes.top_k, shapes.hidden, shapes.intermediate)


def schedule_file(target: str, shapes: ExpertShapes | None = None) -> Path:
    """schedules/<target name>/<shape_key>.yaml (tuned for that layer shape on that target, written by
    `moegen tune run`) when present, else schedules/<target name>.yaml (tuned for that target), else
    schedules/<family>.yaml. `target` may also be a family name (cpu, cuda)."""
    if shapes is not None:
        tuned = SCHEDULES_DIR / target / f"{shape_key(shapes)}.yaml"
        if tuned.is_file():
            return tuned
    own = SCHEDULES_DIR / f"{target}.yaml"
    if own.is_file():
        return own
    from ..targets import load_target

    return SCHEDULES_DIR / f"{load_target(target).family}.yaml"


def read_yaml(path: Path | str, what: str, error: type[Exception]) -> Any:
    """The contents of a YAML file of configs; `error` says, on one line, which `what` file cannot be read."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise error(f"{what} {path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise error(f"{what} {path}: not valid YAML ({' '.join(str(e).split())})") from None


def read_schedule(path: Path | str) -> dict[str, Any]:
    """Parse and check a schedules file (paths + optional routing and pack); ScheduleError names what
    is wrong."""
    path = Path(path)
    data = read_yaml(path, "schedules file", ScheduleError)
    parse_paths(data, str(path))
    _check_routing(data, str(path))
    pack_config(data, str(path))
    return data


_INT_TYPES = ("int",)
_BOOL_TYPES = ("bool",)


def experts_config_from_dict(d: Any, where: str, *, partial: bool = False) -> ExpertsConfig | dict:
    """An ExpertsConfig from a dict, every field checked against the dataclass (so fields added later are
    covered): unknown names, missing required ones, wrong types, ints < 1 (< 0 where the default is 0).
    partial=True checks the given fields only and returns them as a dict (candidate grids)."""
    return _config_from_dict(ExpertsConfig, d, where, partial=partial)


def _config_from_dict(cls, d: Any, where: str, *, partial: bool = False):
    """experts_config_from_dict for any config dataclass `cls`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(d, dict):
        raise ScheduleError(f"{where}: expected a mapping of {' | '.join(fields)}, got {d!r}")
    for k, v in d.items():
        if k not in fields:
            raise ScheduleError(f"{where}.{k}: unknown field; allowed: {' | '.join(fields)}")
        f = fields[k]
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if kind in _BOOL_TYPES and not isinstance(v, bool):
            raise ScheduleError(f"{where}.{k}: got {v!r}; allowed: true | false")
        if kind in _INT_TYPES:
            low = 0 if f.default == 0 else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ScheduleError(f"{where}.{k}: got {v!r}; allowed: an integer >= {low}")
    if partial:
        return dict(d)
    missing = [n for n, f in fields.items() if n not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ScheduleError(f"{where}: missing {' | '.join(missing)}")
    return cls(**d)


def parse_paths(data: Any, source: str) -> list[PathConfig]:
    """The `paths:` list of a schedules file, checked: unique identifier names, bounds > 0 increasing,
    the last one null, every experts field valid."""
    import re

    if not isinstance(data, dict) or not isinstance(data.get("paths"), list) or not data["paths"]:
        raise ScheduleError(f"schedules file {source}: expected a non-empty `paths:` list")
    unknown = sorted(set(data) - {"paths", "routing", "pack"})
    if unknown:
        raise ScheduleError(f"schedules file {source}: unknown section {unknown[0]!r}; allowed: paths | routing | pack")
    paths, last = [], 0.0
    for i, p in enumerate(data["paths"]):
        where = f"schedules file {source}: paths[{i}]"
        if not isinstance(p, dict):
            raise ScheduleError(f"{where}: expected a mapping with name, max_rows_per_expert, experts")
        extra = sorted(set(p) - {"name", "max_rows_per_expert", "experts"})
        if extra:
            raise ScheduleError(f"{where}.{extra[0]}: unknown field; allowed: name | max_rows_per_expert | experts")
        name = p.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ScheduleError(f"{where}.name: got {name!r}; allowed: an identifier (letters, digits, _)")
        if name in {q.name for q in paths}:
            raise ScheduleError(f"{where}.name: {name!r} is used twice")
        bound = p.get("max_rows_per_expert")
        final = i == len(data["paths"]) - 1
        if final and bound is not None:
            raise ScheduleError(f"{where}.max_rows_per_expert: got {bound!r}; the last path must be null")
        if not final and (isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > last):
            raise ScheduleError(f"{where}.max_rows_per_expert: got {bound!r}; allowed: a number > {last:g} "
                                "(bounds increase; null only on the last path)")
        if not final:
            last = float(bound)
        paths.append(PathConfig(name=name, max_rows_per_expert=bound,
                                experts=experts_config_from_dict(p.get("experts"), f"{where}.experts")))
    return paths


def _check_routing(data: dict, source: str) -> None:
    r = data.get("routing")
    if r is None:
        return
    if not isinstance(r, dict) or any(k not in ("warps_per_block", "route_dispatch") for k in r):
        raise ScheduleError(f"schedules file {source}: routing: expected {{warps_per_block: N, route_dispatch: "
                            f"{' | '.join(ROUTE_DISPATCH_KINDS)}}}, got {r!r}")
    w = r.get("warps_per_block", 0)
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
        raise ScheduleError(f"schedules file {source}: routing.warps_per_block: got {w!r}; allowed: an integer >= 0")
    k = r.get("route_dispatch", "warps")
    if k not in ROUTE_DISPATCH_KINDS:
        raise ScheduleError(f"schedules file {source}: routing.route_dispatch: got {k!r}; allowed: "
                            f"{' | '.join(ROUTE_DISPATCH_KINDS)}")
    if k == "rank" and not w:
        raise ScheduleError(f"schedules file {source}: routing.route_dispatch: rank is a GPU kernel (a thread block "
                            "per token); it needs warps_per_block > 0 (the GPU routing)")


def pack_config(data: dict[str, Any] | None, source: str) -> PackConfig | None:
    """The optional `pack:` section of a schedules file, checked (None: no pack kernels in the
    artifact; the runner packs the weights with torch, runtime/packing.py)."""
    p = (data or {}).get("pack")
    if p is None:
        return None
    cfg = _config_from_dict(PackConfig, p, f"schedules file {source}: pack")
    why = pack_config_ok(cfg)
    if why is not None:
        raise ScheduleError(f"schedules file {source}: {why}")
    return cfg


def load_paths(target: str, data: dict[str, Any] | None = None, shapes: ExpertShapes | None = None) -> list[PathConfig]:
    """Paths for a target (or family) from schedule_file(target, shapes) (or `data`), last one unbounded."""
    if data is None:
        return parse_paths(read_schedule(schedule_file(target, shapes)), target)
    return parse_paths(data, target)


def path_records(paths: list[PathConfig], shapes: ExpertShapes) -> list[dict]:
    """What the manifest stores of each path: its bucket bound and the config fitted to this layer."""
    return [{"name": p.name, "max_rows_per_expert": p.max_rows_per_expert,
             "config": dataclasses.asdict(fit_config(p.experts, shapes))} for p in paths]


# routing.route_dispatch, the routing kernel of the paths without the sort (decode): "warps" (one warp
# per token, as the routing kernel) or "rank" (one thread block per token, a thread per expert:
# kernels/routing.py routing_rank_func, for the few tokens those paths take)
ROUTE_DISPATCH_KINDS = ("warps", "rank")
RANK_MAX_EXPERTS = 1024  # the rank kernel's thread per expert: a thread block's limit (more: warps)


def load_routing_config(target: str, data: dict[str, Any] | None = None) -> dict:
    """The optional `routing:` section of schedule_file(target) (or `data`) (GPU: warps_per_block,
    route_dispatch)."""
    if data is None:
        data = read_schedule(schedule_file(target))
    return dict((data or {}).get("routing") or {})
