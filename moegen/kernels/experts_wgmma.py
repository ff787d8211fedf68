"""The expert GEMMs on Hopper's warpgroup tensor cores (wgmma, sm_90a): the same contract as
kernels.experts.experts_up_func / experts_down_func with stage_operands (arguments, packed weight
layout, outputs; twins `reference.experts_up_ref` and `experts_down_ref`), written at thread level
because TVM 0.27 has no wgmma tensor intrinsic for its schedules: the kernels name their threads,
shared memory and instructions themselves (as kernels.dispatch does), from a WgmmaTile.

Shape legend: T tokens (symbolic), K top-k, S = T*K slots, El local experts, Hp padded hidden,
I intermediate, KD the weights' rows (Hp for up, I for down), KA the reduction and A's width (up: Hx,
the columns of x, which with padding end at the routed width rounded up to 64: w13's rows past it are zeros; down: I), BM rows per block (64 per warpgroup), PN
columns per packed weight tile (the layout), SPAN packed tiles per block, BN = PN * SPAN columns per
MMA, BK = 64 reduction elements per pipeline step (one 128-byte swizzle row of a 16-bit dtype), NT
column blocks (packed tiles / SPAN), MB blocks at most, G sorted blocks per raster group.

One thread block per (column block, sorted block), BM / 64 warpgroups of 128 threads; warpgroup w
computes rows 64w .. 64w + 63 of the block against all BN columns, its fp32 accumulator in registers
(BN / 2 per thread, wgmma's fragment layout). Per BK step the operands go through a ring of `stages`
shared-memory buffers, filled with 16-byte cp.async copies STAGES - 2 steps ahead while the MMAs of
the step before run on (wgmma.wait_group 1; the ring's last buffer is the one they read):
    A [BM, BK]  K-major (rows gathered from x: token of sorted_ids[row]; down: act rows in place),
                128-byte swizzle: chunk q (16 bytes) of row r at r * 128 + (q ^ r % 8) * 16
    B [BK, BN]  the packed tiles w[e, t * SPAN + p, k, :] side by side, N-major: atoms of 64 columns, BK
                rows of 128 bytes each, swizzled the same way (row k, chunk q at atom * BK * 128 + k * 128
                + (q ^ k % 8) * 16)
and a step is BK / 16 wgmma.m64nBNk16 per warpgroup, both operands named by shared-memory descriptors.
The epilogue runs on the registers: in each packed tile up pairs gate column c with up column c + PN/2
(the same thread holds both), down scales its rows by their routing weight. It stores each value straight
to `out` (2 bytes a thread, 8 of every 32-byte sector a warp store touches), or, staged (WgmmaTile.staged_store,
the classic loop with 16-bit outputs), writes them into the idle ring and the block then stores whole rows in
16-byte chunks (H100, Qwen3-30B-A3B at 4096 tokens: the down GEMM 410 -> 266 us; docs/perf.md, session 10).
Blocks past num_blocks exit at once (uniformly per thread block); in a classic block
of several warpgroups, one whose 64 rows are all the expert's padding skips its MMAs and epilogue (_live).

Warp-specialised form (WgmmaTile.producer; _ws_gemm_func): one more warpgroup, the producer, issues
every copy; the ring's buffers carry a full and an empty mbarrier each, so the consumers never meet at
a block-wide barrier, and n_sm persistent blocks walk the same raster, the producer loading the next
tile while the consumers run this one's epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T

from . import token_var
from .experts import ExpertShapes, _act, _max_blocks

BK = 64  # reduction elements per step: one 128-byte swizzle row of a 16-bit operand
ROW_BYTES = 128  # the swizzle span
SWIZZLE_ROWS = 8  # rows per swizzle pattern (1024 bytes)
ATOM_COLS = 64  # N-major B: columns per swizzle atom
CHUNK = 8  # 16-bit elements per 16-byte copy
CHUNK_BYTES = 16  # one cp.async, and the swizzle's unit
ROW_CHUNKS = ROW_BYTES // CHUNK_BYTES  # 16-byte chunks per 128-byte row (of A, and of one B atom)
WARPGROUP = 128
WG_ROWS = 64  # rows per wgmma (m64)
MMA_K = 16  # reduction per wgmma
ALIGN = 1024  # the swizzle repeats every 1024 bytes: operand buffers start on that boundary
DESC_SWIZZLE_128B = 1  # wgmma descriptor layout type
# an empty asm that reads and writes one accumulator register: the compiler cannot move its uses above it
# (TVM's T.cuda.wgmma.noop_barrier does this for a scalar, but its codegen fails on a buffer element)
FENCE_ACC = ('__device__ __forceinline__ void moegen_fence_acc(float& r) '
             '{ asm volatile("" : "+f"(r) :: "memory"); }')


MBAR_BYTES = 8  # one mbarrier (warp-specialised kernels: a full and an empty barrier per ring buffer)


@dataclass(frozen=True)
class WgmmaTile:
    """What one wgmma GEMM kernel specialises on besides the layer shape."""

    block_m: int  # BM, a multiple of 64: BM / 64 (consumer) warpgroups
    block_n: int  # columns of a packed weight tile (the layout), a multiple of 64 (B's swizzle atoms)
    stages: int  # shared-memory buffers in the ring
    group_m: int = 1  # G: raster group of sorted blocks sharing a weight tile (blockIdx.x = t * G + b % G)
    span: int = 1  # packed tiles per block: the MMA is BN = block_n * span wide (at most 256)
    # warp-specialised and persistent: one producer warpgroup fills the ring (cp.async, full/empty
    # mbarriers) while the consumers run the MMAs and the epilogue; n_sm blocks loop over the tiles
    producer: bool = False
    # classic loop, 16-bit outputs: the epilogue writes the block's outputs into the (then idle) ring and
    # the block stores them as whole 16-byte row pieces (_epilogue, _store_staged) instead of each
    # thread storing its accumulators' 2-byte values (8 of every 32-byte sector a warp store touches)
    staged_store: bool = False

    @property
    def mma_n(self) -> int:
        return self.block_n * self.span

    @property
    def consumers(self) -> int:
        return self.block_m // WG_ROWS * WARPGROUP

    @property
    def threads(self) -> int:
        return self.consumers + (WARPGROUP if self.producer else 0)

    @property
    def loaders(self) -> int:
        """The threads issuing the 16-byte copies: the producer warpgroup, or every thread."""
        return WARPGROUP if self.producer else self.threads

    @property
    def stage_bytes(self) -> int:
        return (self.block_m + self.mma_n) * BK * 2

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory asked at launch: the ring (and its barriers), plus room to align its
        start to 1024 bytes."""
        return self.stages * self.stage_bytes + ALIGN + (2 * self.stages * MBAR_BYTES if self.producer else 0)


def _desc(addr, lead_bytes: int, stride_bytes: int):
    """A wgmma shared-memory matrix descriptor (uint64): start address, leading and stride byte offsets
    (in 16-byte units), 128-byte swizzle."""
    return (T.Cast("uint64", T.shift_right(addr, T.uint32(4)) & T.uint32(0x3FFF))
            | T.shift_left(T.uint64(lead_bytes // 16), T.uint64(16))
            | T.shift_left(T.uint64(stride_bytes // 16), T.uint64(32))
            | T.shift_left(T.uint64(DESC_SWIZZLE_128B), T.uint64(62)))


def _mma_call(dtype: str, bn: int):
    """wgmma.mma_async.sync.aligned.m64n{BN}k16.f32.{bf16|f16}.{bf16|f16}, as a TVMScript callable."""
    ab = {"bfloat16": "bf16", "float16": "f16"}[dtype]
    chain = T.ptx.wgmma.mma_async.sync.aligned
    return getattr(getattr(getattr(getattr(chain, f"m64n{bn}k16"), "f32"), ab), ab)


@dataclass(frozen=True)
class _Gemm:
    """The derived constants of one kernel (Python values the TVMScript bodies read)."""

    s: ExpertShapes
    tile: WgmmaTile
    up: bool
    y_dtype: str

    def __post_init__(self):
        t, s = self.tile, self.s
        assert t.block_m % WG_ROWS == 0 and t.block_n % ATOM_COLS == 0 and t.mma_n <= 256 and t.stages >= 3, t
        assert self.ka % BK == 0 and (self.nt_packed % t.span == 0), (self.ka, self.nt_packed, t)
        assert (t.block_m * ROW_CHUNKS) % self.loaders == 0  # (B's chunks may split unevenly: b_per)
        assert not s.weight_on_input, "the routing weight on the input is applied by the mma.sync kernels only"
        assert not self.staged or (t.block_m * self.pitch * 2 <= t.stages * t.stage_bytes
                                   and self.stage_w % CHUNK == 0), (t, self.stage_w)

    kd = property(lambda g: g.s.hidden if g.up else g.s.intermediate)  # the weights' rows
    ka = property(lambda g: g.s.hx if g.up else g.s.intermediate)  # the reduction: A's columns
    nt_packed = property(lambda g: (g.s.n13 if g.up else g.s.hidden) // g.tile.block_n)  # packed tiles
    nt = property(lambda g: g.nt_packed // g.tile.span)  # blocks across the columns
    gated = property(lambda g: g.up and g.s.gated)
    kind = property(lambda g: "gated" if g.gated else ("up" if g.up else "down"))
    out_w = property(lambda g: g.s.intermediate if g.up else g.s.hidden)
    out_dt = property(lambda g: g.s.dtype if g.up else g.y_dtype)
    nk = property(lambda g: g.ka // BK)  # k steps
    loaders = property(lambda g: g.tile.loaders)
    a_per = property(lambda g: g.tile.block_m * ROW_CHUNKS // g.loaders)  # A chunks per loader per step
    b_chunks = property(lambda g: BK * (g.tile.mma_n // CHUNK))  # B's 16-byte chunks per step
    # ... per loader (rounded up: 384 loaders of a 192-row block share 2048 chunks, the last round guarded)
    b_per = property(lambda g: -(-g.b_chunks // g.loaders))
    b_even = property(lambda g: g.b_chunks % g.loaders == 0)
    acc = property(lambda g: g.tile.mma_n // 2)  # fp32 accumulators per consumer thread
    apt = property(lambda g: g.tile.block_n // 2)  # ... of them per packed tile
    half = property(lambda g: g.tile.block_n // 2 if g.gated else g.tile.block_n)  # outputs per packed tile
    per = property(lambda g: g.apt // 2 if g.gated else g.apt)  # output accumulators per packed tile
    # the staged epilogue (WgmmaTile.staged_store): the block's SW = span * half output columns, row r at
    # r * pitch of the ring (one 16-byte chunk of padding per row: a warp's stores of 8 rows x 4 threads
    # fall on 32 different banks), stored by every thread as 16-byte chunks, chunks_per of them each
    staged = property(lambda g: g.tile.staged_store and not g.tile.producer and g.out_dt == g.s.dtype)
    stage_w = property(lambda g: g.tile.span * g.half)
    pitch = property(lambda g: g.stage_w + CHUNK)
    row_chunks = property(lambda g: g.stage_w // CHUNK)
    chunks_per = property(lambda g: -(-g.tile.block_m * g.row_chunks // g.tile.threads))
    chunks_even = property(lambda g: g.tile.block_m * g.row_chunks % g.tile.threads == 0)


def _wgmma_gemm_func(s: ExpertShapes, tile: WgmmaTile, up: bool, y_dtype: str):
    """The shared body of both kernels; `up` picks the A source, the epilogue and the signature.
    tile.producer: the warp-specialised persistent form (_ws_gemm_func)."""
    g = _Gemm(s, tile, up, y_dtype)
    if tile.producer:
        return _ws_gemm_func(g)
    g_dt, g_K, g_BM, g_S, g_G, g_TH = s.dtype, s.top_k, tile.block_m, tile.stages, tile.group_m, tile.threads
    g_NT, g_nk, g_ACC = g.nt, g.nk, g.acc
    g_STAGE, g_A_BYTES = tile.stage_bytes, g_BM * ROW_BYTES
    g_mma = _mma_call(g_dt, tile.mma_n)
    tok = token_var()
    n_slots = tok * g_K
    n_blocks = _max_blocks(n_slots, g_BM, s.local_experts, False)
    n_groups = (n_blocks + (g_G - 1)) // g_G
    a_rows = tok if up else n_blocks * g_BM  # x [T, Hx] | act [MP, I]

    @T.prim_func
    def gemm(a_h: T.handle, tw_h: T.handle, sorted_h: T.handle, bexp_h: T.handle, nblk_h: T.handle,
             w_h: T.handle, b_h: T.handle, out_h: T.handle):
        T.func_attr({"tir.noalias": True})
        a = T.match_buffer(a_h, (a_rows, g.ka), g_dt)
        topk_weights = T.match_buffer(tw_h, (tok, g_K), "float32")
        sorted_ids = T.match_buffer(sorted_h, (n_blocks * g_BM,), "int32")
        block_expert = T.match_buffer(bexp_h, (n_blocks,), "int32")
        num_blocks = T.match_buffer(nblk_h, (1,), "int32")
        w = T.match_buffer(w_h, (s.local_experts, g.nt_packed, g.kd, tile.block_n), g_dt)
        bias = T.match_buffer(b_h, (s.local_experts, g.nt_packed, tile.block_n), g_dt)
        out = T.match_buffer(out_h, (n_blocks * g_BM, g.out_w), g.out_dt)
        bx = T.launch_thread("blockIdx.x", g_NT * g_G)
        by = T.launch_thread("blockIdx.y", n_groups)
        tx = T.launch_thread("threadIdx.x", g_TH)
        ring = T.alloc_buffer((tile.smem_bytes // 2,), g_dt, scope="shared.dyn")
        acc = T.alloc_buffer((g_ACC,), "float32", scope="local")
        arow = T.alloc_buffer((g.a_per,), "int64", scope="local")
        tw = T.alloc_buffer((2,), "float32", scope="local")
        live = T.alloc_buffer((1,), "int32", scope="local")  # this warpgroup has rows (_live)
        blk = T.Cast("int64", by) * g_G + T.Cast("int64", bx % g_G)
        nt = T.Cast("int64", bx // g_G)
        if T.tvm_thread_invariant(blk < T.Cast("int64", num_blocks[0])):
            e = T.Cast("int64", block_expert[blk])
            base = _ring_base(ring)
            _a_rows(g, arow, sorted_ids, blk, tx, n_slots)
            for j in T.unroll(g_ACC):
                acc[j] = T.float32(0)
            live[0] = _live(g, sorted_ids, blk, tx, n_slots)
            for p in T.unroll(g_S - 2):  # prologue: the first STAGES - 2 steps in flight
                if p < g_nk:
                    _load_step(g, p, p, base, a, w, e, nt, arow, tx)
                T.ptx.cp.async_.commit_group()
            for k in range(g_nk):
                T.ptx.cp.async_.wait_group(g_S - 3)  # step k has landed (this thread's copies)
                T.ptx.fence.proxy.async_.shared__cta()  # ... and is visible to the tensor cores
                # every thread's copies of step k are in; every warpgroup's MMAs of step k - 2 are done
                # (each waited for all but its last group before coming here): step k - 2's buffer is free
                T.tvm_storage_sync("shared")
                if k + (g_S - 2) < g_nk:
                    _load_step(g, k + (g_S - 2), (k + (g_S - 2)) % g_S, base, a, w, e, nt, arow, tx)
                T.ptx.cp.async_.commit_group()
                if live[0] != 0:  # rows of this warpgroup hold slots
                    _mma_step(g_mma, acc, g_ACC, base, (k % g_S) * g_STAGE, tx, g_A_BYTES)
                T.ptx.wgmma.wait_group.sync.aligned(1)  # step k's MMAs run on while step k + 1 starts
            T.ptx.wgmma.wait_group.sync.aligned(0)
            _classic_epilogue(g, acc, ring, out, bias, topk_weights, tw, sorted_ids, blk, e, nt, tx, n_slots, live)

    return gemm


def _ws_gemm_func(g: _Gemm):
    """The warp-specialised persistent form: thread block i of n_sm takes tiles i, i + n_sm, ... of the
    raster (the same order as the grid of _wgmma_gemm_func). Warpgroup 0 produces: for each k step it
    waits for the ring buffer's `empty` barrier, issues the step's cp.async copies and has them arrive
    on its `full` barrier (cp.async.mbarrier.arrive.noinc: when this thread's copies have landed).
    Warpgroups 1.. consume: wait on `full`, run the step's MMAs, and once the MMAs of the step before
    are done arrive on that step's `empty` barrier. The producer runs up to STAGES steps ahead, into
    the next tile while the consumers run this tile's epilogue; no block-wide barrier in the loop."""
    s, tile = g.s, g.tile
    g_dt, g_K, g_BM, g_S, g_G, g_TH = s.dtype, s.top_k, tile.block_m, tile.stages, tile.group_m, tile.threads
    g_NT, g_nk, g_ACC, g_CTH = g.nt, g.nk, g.acc, tile.consumers
    g_STAGE, g_A_BYTES = tile.stage_bytes, g_BM * ROW_BYTES
    g_mma = _mma_call(g_dt, tile.mma_n)
    up = g.up
    tok = token_var()
    n_slots = tok * g_K
    n_blocks = _max_blocks(n_slots, g_BM, s.local_experts, False)
    n_items = (n_blocks + (g_G - 1)) // g_G * (g_NT * g_G)  # the raster's tiles at most
    a_rows = tok if up else n_blocks * g_BM

    @T.prim_func
    def gemm(a_h: T.handle, tw_h: T.handle, sorted_h: T.handle, bexp_h: T.handle, nblk_h: T.handle,
             w_h: T.handle, b_h: T.handle, out_h: T.handle, n_sm: T.int64):
        T.func_attr({"tir.noalias": True})
        a = T.match_buffer(a_h, (a_rows, g.ka), g_dt)
        topk_weights = T.match_buffer(tw_h, (tok, g_K), "float32")
        sorted_ids = T.match_buffer(sorted_h, (n_blocks * g_BM,), "int32")
        block_expert = T.match_buffer(bexp_h, (n_blocks,), "int32")
        num_blocks = T.match_buffer(nblk_h, (1,), "int32")
        w = T.match_buffer(w_h, (s.local_experts, g.nt_packed, g.kd, tile.block_n), g_dt)
        bias = T.match_buffer(b_h, (s.local_experts, g.nt_packed, tile.block_n), g_dt)
        out = T.match_buffer(out_h, (n_blocks * g_BM, g.out_w), g.out_dt)
        bx = T.launch_thread("blockIdx.x", T.min(n_sm, n_items))
        tx = T.launch_thread("threadIdx.x", g_TH)
        ring = T.alloc_buffer((tile.smem_bytes // 2,), g_dt, scope="shared.dyn")
        acc = T.alloc_buffer((g_ACC,), "float32", scope="local")
        arow = T.alloc_buffer((g.a_per,), "int64", scope="local")
        tw = T.alloc_buffer((2,), "float32", scope="local")
        step = T.alloc_buffer((1,), "int32", scope="local")  # k steps this thread has passed (all tiles)
        base = _ring_base(ring)
        bars = base + T.uint32(g_S * g_STAGE)  # full[s] at bars + 8 s, empty[s] at bars + 8 (S + s)
        if tx == 0:
            for st in range(g_S):
                T.ptx.mbarrier.init.shared.b64(_full(bars, st), T.uint32(WARPGROUP))
                T.ptx.mbarrier.init.shared.b64(_empty(bars, g_S, st), T.uint32(g_CTH))
        T.tvm_storage_sync("shared")
        step[0] = 0
        nb = T.Cast("int64", num_blocks[0])
        grid = T.min(n_sm, n_items)
        for i in range((n_items + grid - 1) // grid):
            item = T.Cast("int64", bx) + i * grid
            blk = item // (g_NT * g_G) * g_G + item % g_G
            nt = item % (g_NT * g_G) // g_G
            if item < (nb + (g_G - 1)) // g_G * (g_NT * g_G) and blk < nb:
                e = T.Cast("int64", block_expert[blk])
                if tx < WARPGROUP:  # the producer
                    _a_rows(g, arow, sorted_ids, blk, tx, n_slots)
                    for k in range(g_nk):
                        # the buffer's consumers have released its last use (passes at once the first time)
                        T.cuda.mbarrier_wait(_empty(bars, g_S, step[0] % g_S), T.bitwise_xor(step[0] // g_S % 2, 1))
                        _load_step(g, k, step[0] % g_S, base, a, w, e, nt, arow, tx)
                        T.ptx.cp.async_.mbarrier.arrive.noinc.shared.b64(_full(bars, step[0] % g_S))
                        step[0] = step[0] + 1
                else:  # the consumers (thread tx - 128 of them)
                    for j in T.unroll(g_ACC):
                        acc[j] = T.float32(0)
                    for k in range(g_nk):
                        T.cuda.mbarrier_wait(_full(bars, step[0] % g_S), step[0] // g_S % 2)
                        T.ptx.fence.proxy.async_.shared__cta()  # the producer's copies, to the tensor cores
                        _mma_step(g_mma, acc, g_ACC, base, step[0] % g_S * g_STAGE, tx - WARPGROUP, g_A_BYTES)
                        T.ptx.wgmma.wait_group.sync.aligned(1)  # the step before is done: release its buffer
                        if k > 0:  # the buffer of the step before
                            T.ptx.mbarrier.arrive.shared.b64(_empty(bars, g_S, (step[0] + (g_S - 1)) % g_S),
                                                             T.uint32(1))
                        step[0] = step[0] + 1
                    T.ptx.wgmma.wait_group.sync.aligned(0)
                    T.ptx.mbarrier.arrive.shared.b64(_empty(bars, g_S, (step[0] + (g_S - 1)) % g_S), T.uint32(1))
                    _epilogue(g, acc, out, ring, bias, topk_weights, tw, sorted_ids, blk, e, nt, tx - WARPGROUP,
                              n_slots, False)

    return gemm


def _live(g, sorted_ids, blk, ct, n_slots):
    """Whether consumer thread ct's warpgroup has work in block blk: its first row holds a slot. An
    expert's slots fill its rows first and the padding (sentinel S) comes last, so a warpgroup whose
    first row is padding has only padding: it skips its MMAs and its epilogue (those rows of act / y
    are never read: the down GEMM's warpgroup of the same rows skips them too, combine reads slots
    only). The same for every thread of the warpgroup, as wgmma's .sync.aligned needs. One warpgroup:
    always (a block below num_blocks holds a slot). An int32 flag read once per tile. The classic loop
    only: in the warp-specialised one the skipping consumers cost 4-5% (gpt-oss-20b and Mixtral at 4096
    tokens, runs 25-26, flag in the loop or hoisted), likely spinning on the full barrier while the
    producer needs the issue slots."""
    has = _has_slots(g, sorted_ids, blk, ct // WARPGROUP, n_slots)
    return 1 if has is True else T.Cast("int32", has)


def _has_slots(g, sorted_ids, blk, wg, n_slots):
    """Whether warpgroup wg of block blk has rows holding slots: its first row does (True, a Python value,
    for a one-warpgroup block, which always does)."""
    if g.tile.block_m == WG_ROWS:
        return True
    return T.Cast("int64", sorted_ids[blk * g.tile.block_m + wg * WG_ROWS]) < n_slots


def _full(bars, stage):
    """The shared address of ring buffer `stage`'s full barrier (its copies have landed)."""
    return bars + T.Cast("uint32", stage * MBAR_BYTES)


def _empty(bars, stages, stage):
    """The shared address of ring buffer `stage`'s empty barrier (its MMAs are done)."""
    return bars + T.Cast("uint32", (stages + stage) * MBAR_BYTES)


def _ring_base(ring):
    """The ring starts at the first 1024-byte boundary of the dynamic shared memory (a uint32 shared
    address)."""
    return (T.cuda.cvta_generic_to_shared(ring.access_ptr("rw")) + T.uint32(ALIGN - 1)) \
        & T.uint32(0xFFFFFFFF - (ALIGN - 1))


def _value(g, acc, bias, tw, e, pt, j0, ct, jl):
    """The fp32 output of accumulator j0 + jl (packed tile pt, whose accumulators start at j0). gated:
    the activation of gate column c and up column c + half (accumulators j and j + apt / 2); up: the
    activation of column c; down: (sum + bias) x the routing weight of its row."""
    s = g.s

    def biased(jj, c):
        return acc[j0 + jj] + (T.Cast("float32", bias[e, pt, c]) if s.expert_bias else T.float32(0))

    if g.kind == "gated":
        return _act(s.activation, biased(jl, _col(ct, jl)), biased(jl + g.apt // 2, g.half + _col(ct, jl)),
                    s.swiglu_alpha, s.swiglu_limit)
    if g.kind == "up":
        return _act(s.activation, biased(jl, _col(ct, jl)), None, s.swiglu_alpha, s.swiglu_limit)
    return biased(jl, _col(ct, jl)) * tw[jl % 4 // 2]


def _row(ct, h):
    """Row of the block held by consumer thread ct in accumulator half h (0: lane / 4, 1: lane / 4 + 8)."""
    return (ct // WARPGROUP) * WG_ROWS + (ct % WARPGROUP) // 32 * 16 + (ct % 32) // 4 + 8 * h


def _col(ct, j):
    """Column (of its packed tile) held by consumer thread ct in accumulator j."""
    return 8 * (j // 4) + 2 * (ct % 4) + j % 2


@T.macro
def _a_rows(g, arow, sorted_ids, blk, lt, n_slots):
    """The start in `a` of loader lt's A rows: gathered tokens (up) or the block's own rows (down)."""
    for i in T.unroll(g.a_per):
        if g.up:
            arow[i] = T.min(T.Cast("int64", sorted_ids[blk * g.tile.block_m + (i * g.loaders + lt) // ROW_CHUNKS]),
                            n_slots - 1) // g.s.top_k
        else:
            arow[i] = blk * g.tile.block_m + (i * g.loaders + lt) // ROW_CHUNKS


@T.macro
def _mma_step(mma, acc, n_acc, base, stage_off, ct, a_bytes):
    """One BK step of warpgroup ct / 128's MMAs from the ring buffer at base + stage_off, committed as
    a group."""
    T.ptx.wgmma.fence.sync.aligned()
    for ks in T.unroll(BK // MMA_K):
        mma(*[acc[j] for j in range(n_acc)],
            _desc(base + T.Cast("uint32", stage_off + (ct // WARPGROUP) * WG_ROWS * ROW_BYTES + ks * MMA_K * 2), 16,
                  SWIZZLE_ROWS * ROW_BYTES),
            _desc(base + T.Cast("uint32", stage_off + a_bytes + ks * MMA_K * ROW_BYTES), BK * ROW_BYTES,
                  SWIZZLE_ROWS * ROW_BYTES),
            True, 1, 1, 0, 1)
    T.ptx.wgmma.commit_group.sync.aligned()


@T.macro
def _row_weights(g, topk_weights, tw, sorted_ids, blk, ct, n_slots):
    """down: the routing weights of consumer thread ct's two rows into tw (up: nothing)."""
    if not g.up:
        for h in T.unroll(2):
            tw[h] = topk_weights[
                T.min(T.Cast("int64", sorted_ids[blk * g.tile.block_m + _row(ct, h)]), n_slots - 1) // g.s.top_k,
                T.min(T.Cast("int64", sorted_ids[blk * g.tile.block_m + _row(ct, h)]), n_slots - 1) % g.s.top_k]


@T.macro
def _epilogue(g, acc, out, ring, bias, topk_weights, tw, sorted_ids, blk, e, nt, ct, n_slots, staged):
    """The outputs from the registers of consumer thread ct: accumulator j is row 16 * warp + lane / 4
    + 8 * (j % 4 / 2) of its warpgroup's 64, column 8 * (j / 4) + 2 * (lane % 4) + j % 2 of the MMA;
    packed tile p of the block holds accumulators p * apt ... (gated: gate column c at jl, up column
    c + half at jl + apt / 2). Into `out`, or (staged) into the ring: output column c of block row r at
    r * pitch + c (_store_staged takes them from there)."""
    for j in T.unroll(g.acc):  # the accumulators are read only after the last MMA (no hoisting)
        T.cuda.func_call("moegen_fence_acc", acc[j], source_code=FENCE_ACC)
    _row_weights(g, topk_weights, tw, sorted_ids, blk, ct, n_slots)
    for p in T.unroll(g.tile.span):
        for jl in T.unroll(g.per):
            if staged:
                ring[_row(ct, jl % 4 // 2) * g.pitch + p * g.half + _col(ct, jl)] = T.Cast(
                    g.out_dt, _value(g, acc, bias, tw, e, nt * g.tile.span + p, p * g.apt, ct, jl))
            else:
                out[blk * g.tile.block_m + _row(ct, jl % 4 // 2), (nt * g.tile.span + p) * g.half + _col(ct, jl)] = (
                    T.Cast(g.out_dt, _value(g, acc, bias, tw, e, nt * g.tile.span + p, p * g.apt, ct, jl)))


@T.macro
def _store_staged(g, ring, out, sorted_ids, blk, nt, tx, n_slots):
    """Every thread stores chunks i * threads + tx of the staged rows (row_chunks 16-byte chunks a row,
    adjacent threads along a row), skipping the rows of warpgroups that had only padding (_live)."""
    for i in T.unroll(g.chunks_per):
        if g.chunks_even or i * g.tile.threads + tx < g.tile.block_m * g.row_chunks:
            if _has_slots(g, sorted_ids, blk, (i * g.tile.threads + tx) // g.row_chunks // WG_ROWS, n_slots):
                out[blk * g.tile.block_m + (i * g.tile.threads + tx) // g.row_chunks,
                    T.ramp(nt * g.stage_w + (i * g.tile.threads + tx) % g.row_chunks * CHUNK, 1, CHUNK)] = ring[
                    T.ramp((i * g.tile.threads + tx) // g.row_chunks * g.pitch
                           + (i * g.tile.threads + tx) % g.row_chunks * CHUNK, 1, CHUNK)]


@T.macro
def _classic_epilogue(g, acc, ring, out, bias, topk_weights, tw, sorted_ids, blk, e, nt, tx, n_slots, live):
    """The classic loop's outputs: straight from the registers (_epilogue), or staged through the ring.
    Staged: once every warpgroup's MMAs are done (the barrier) no copy or MMA reads the ring any more (the
    last steps issued no copies), the live warpgroups write their outputs into it, and after a second
    barrier every thread stores 16-byte chunks of whole rows."""
    if g.staged:
        T.tvm_storage_sync("shared")
        if live[0] != 0:
            _epilogue(g, acc, out, ring, bias, topk_weights, tw, sorted_ids, blk, e, nt, tx, n_slots, True)
        T.tvm_storage_sync("shared")
        _store_staged(g, ring, out, sorted_ids, blk, nt, tx, n_slots)
    else:
        if live[0] != 0:
            _epilogue(g, acc, out, ring, bias, topk_weights, tw, sorted_ids, blk, e, nt, tx, n_slots, False)


@T.macro
def _b_copy(g, i, k, stage, base, w, e, nt, lt):
    """B chunk i * loaders + lt of reduction step k into ring buffer `stage`."""
    T.ptx.cp.async_.cg.shared.global_(
        base + T.Cast("uint32", stage * g.tile.stage_bytes + g.tile.block_m * ROW_BYTES
                      + (i * g.loaders + lt) % (g.tile.mma_n // CHUNK) // ROW_CHUNKS * (BK * ROW_BYTES)
                      + (i * g.loaders + lt) // (g.tile.mma_n // CHUNK) * ROW_BYTES
                      + T.bitwise_xor((i * g.loaders + lt) % (g.tile.mma_n // CHUNK) % ROW_CHUNKS,
                                      (i * g.loaders + lt) // (g.tile.mma_n // CHUNK) % SWIZZLE_ROWS)
                      * CHUNK_BYTES),
        T.address_of(w[e, nt * g.tile.span + (i * g.loaders + lt) % (g.tile.mma_n // CHUNK) // (g.tile.block_n // CHUNK),
                       T.Cast("int64", k) * BK + (i * g.loaders + lt) // (g.tile.mma_n // CHUNK),
                       (i * g.loaders + lt) % (g.tile.mma_n // CHUNK) % (g.tile.block_n // CHUNK) * CHUNK]),
        CHUNK_BYTES)


@T.macro
def _load_step(g, k, stage, base, a, w, e, nt, arow, lt):
    """cp.async of reduction step k into ring buffer `stage`: loader lt's A and B chunks. B chunk c of a
    row (c < BN / 8) comes from packed tile nt * span + c / (block_n / 8)."""
    for i in T.unroll(g.a_per):
        T.ptx.cp.async_.cg.shared.global_(
            base + T.Cast("uint32", stage * g.tile.stage_bytes + (i * g.loaders + lt) // ROW_CHUNKS * ROW_BYTES
                          + T.bitwise_xor((i * g.loaders + lt) % ROW_CHUNKS,
                                          (i * g.loaders + lt) // ROW_CHUNKS % SWIZZLE_ROWS) * CHUNK_BYTES),
            T.address_of(a[arow[i], T.Cast("int64", k) * BK + (i * g.loaders + lt) % ROW_CHUNKS * CHUNK]),
            CHUNK_BYTES)
    for i in T.unroll(g.b_per):
        if g.b_even:
            _b_copy(g, i, k, stage, base, w, e, nt, lt)
        elif i * g.loaders + lt < g.b_chunks:
            _b_copy(g, i, k, stage, base, w, e, nt, lt)


def experts_up_wgmma_func(s: ExpertShapes, tile: WgmmaTile):
    """experts_up_func's contract (stage_operands, grid_blocks) on wgmma; tile.producer adds the
    argument n_sm (the GPU's multiprocessors: the persistent grid)."""
    return _wgmma_gemm_func(s, tile, True, s.dtype)


def experts_down_wgmma_func(s: ExpertShapes, tile: WgmmaTile, y_dtype: str = "float32"):
    """experts_down_func's contract (stage_operands, grid_blocks) on wgmma; tile.producer adds n_sm."""
    return _wgmma_gemm_func(s, tile, False, y_dtype)
