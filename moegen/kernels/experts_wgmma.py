"""The expert GEMMs on Hopper's warpgroup tensor cores (wgmma, sm_90a): the same contract as
kernels.experts.experts_up_func / experts_down_func with stage_operands (arguments, packed weight
layout, outputs; twins `reference.experts_up_ref` and `experts_down_ref`), written at thread level
because TVM 0.27 has no wgmma tensor intrinsic for its schedules: the kernels name their threads,
shared memory and instructions themselves (as kernels.dispatch does), from a WgmmaTile.

Shape legend: T tokens (symbolic), K top-k, S = T*K slots, El local experts, Hp padded hidden,
I intermediate, KD the reduction (Hp for up, I for down), BM rows per block (64 per warpgroup), BN
columns per weight tile, BK = 64 reduction elements per pipeline step (one 128-byte swizzle row of a
16-bit dtype), NT weight tiles, MB blocks at most, G sorted blocks per raster group.

One thread block per (weight tile, sorted block), BM / 64 warpgroups of 128 threads; warpgroup w
computes rows 64w .. 64w + 63 of the block against all BN columns, its fp32 accumulator in registers
(BN / 2 per thread, wgmma's fragment layout). Per BK step the operands go through a ring of `stages`
shared-memory buffers, filled with 16-byte cp.async copies STAGES - 2 steps ahead while the MMAs of
the step before run on (wgmma.wait_group 1; the ring's last buffer is the one they read):
    A [BM, BK]  K-major (rows gathered from x: token of sorted_ids[row]; down: act rows in place),
                128-byte swizzle: chunk q (16 bytes) of row r at r * 128 + (q ^ r % 8) * 16
    B [BK, BN]  the packed tile w[e, t, k, :] is N-major: atoms of 64 columns, BK rows of 128 bytes each,
                swizzled the same way (row k, chunk q at atom * BK * 128 + k * 128 + (q ^ k % 8) * 16)
and a step is BK / 16 wgmma.m64nBNk16 per warpgroup, both operands named by shared-memory descriptors.
The epilogue runs on the registers: up pairs gate column c with up column c + BN/2 (the same thread
holds both), down scales its rows by their routing weight; nothing goes back through shared memory.
Blocks past num_blocks exit at once (uniformly per thread block).
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


@dataclass(frozen=True)
class WgmmaTile:
    """What one wgmma GEMM kernel specialises on besides the layer shape."""

    block_m: int  # BM, a multiple of 64: BM / 64 warpgroups
    block_n: int  # BN, a multiple of 64 (B's swizzle atoms), at most 256 (wgmma's widest N)
    stages: int  # shared-memory buffers in the ring (>= 3: STAGES - 2 steps load ahead, one MMA step in flight)
    group_m: int = 1  # G: raster group of sorted blocks sharing a weight tile (blockIdx.x = t * G + b % G)

    @property
    def threads(self) -> int:
        return self.block_m // WG_ROWS * WARPGROUP

    @property
    def stage_bytes(self) -> int:
        return (self.block_m + self.block_n) * BK * 2

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory asked at launch: the ring plus room to align its start to 1024 bytes."""
        return self.stages * self.stage_bytes + ALIGN


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


def _wgmma_gemm_func(s: ExpertShapes, tile: WgmmaTile, up: bool, y_dtype: str):
    """The shared body of both kernels; `up` picks the A source, the epilogue and the signature."""
    g_dt, g_El, g_K, g_H, g_I = s.dtype, s.local_experts, s.top_k, s.hidden, s.intermediate
    g_BM, g_BN, g_S, g_G, g_TH = tile.block_m, tile.block_n, tile.stages, tile.group_m, tile.threads
    g_KD = g_H if up else g_I  # the reduction
    g_NT = (s.n13 if up else g_H) // g_BN
    g_half = g_BN // 2 if (up and s.gated) else g_BN  # output columns per tile
    g_out_w = g_I if up else g_H
    g_nk = g_KD // BK
    g_A_PER = g_BM * ROW_CHUNKS // g_TH  # A chunks per thread per step (4)
    g_B_PER = BK * (g_BN // CHUNK) // g_TH  # B chunks per thread per step
    g_BROW = g_BN // CHUNK  # 16-byte chunks per B row
    g_A_BYTES, g_STAGE = g_BM * ROW_BYTES, tile.stage_bytes
    g_ATOM_BYTES = BK * ROW_BYTES  # one 64-column atom of B
    g_ACC = g_BN // 2  # fp32 accumulators per thread
    g_gated, g_bias, g_woi = up and s.gated, s.expert_bias, s.weight_on_input
    g_act, g_alpha, g_limit = s.activation, s.swiglu_alpha, s.swiglu_limit
    g_out_dt = g_dt if up else y_dtype
    g_kind = "gated" if g_gated else ("up" if up else "down")
    g_mma = _mma_call(g_dt, g_BN)
    g_smem_elems = tile.smem_bytes // 2
    assert g_BM % WG_ROWS == 0 and g_BN % ATOM_COLS == 0 and g_BN <= 256 and g_S >= 3, tile
    assert g_KD % BK == 0 and g_A_PER * g_TH == g_BM * ROW_CHUNKS and g_B_PER * g_TH == BK * g_BN // CHUNK
    assert not g_woi, "the routing weight on the input is applied by the mma.sync kernels only"
    tok = token_var()
    n_slots = tok * g_K
    n_blocks = _max_blocks(n_slots, g_BM, g_El, False)
    n_groups = (n_blocks + (g_G - 1)) // g_G
    a_rows = tok if up else n_blocks * g_BM  # x [T, Hp] | act [MP, I]

    @T.prim_func
    def gemm(a_h: T.handle, tw_h: T.handle, sorted_h: T.handle, bexp_h: T.handle, nblk_h: T.handle,
             w_h: T.handle, b_h: T.handle, out_h: T.handle):
        T.func_attr({"tir.noalias": True})
        a = T.match_buffer(a_h, (a_rows, g_KD), g_dt)
        topk_weights = T.match_buffer(tw_h, (tok, g_K), "float32")
        sorted_ids = T.match_buffer(sorted_h, (n_blocks * g_BM,), "int32")
        block_expert = T.match_buffer(bexp_h, (n_blocks,), "int32")
        num_blocks = T.match_buffer(nblk_h, (1,), "int32")
        w = T.match_buffer(w_h, (g_El, g_NT, g_KD, g_BN), g_dt)
        bias = T.match_buffer(b_h, (g_El, g_NT, g_BN), g_dt)
        out = T.match_buffer(out_h, (n_blocks * g_BM, g_out_w), g_out_dt)
        bx = T.launch_thread("blockIdx.x", g_NT * g_G)
        by = T.launch_thread("blockIdx.y", n_groups)
        tx = T.launch_thread("threadIdx.x", g_TH)
        ring = T.alloc_buffer((g_smem_elems,), g_dt, scope="shared.dyn")
        acc = T.alloc_buffer((g_ACC,), "float32", scope="local")
        arow = T.alloc_buffer((g_A_PER,), "int64", scope="local")
        tw = T.alloc_buffer((2,), "float32", scope="local")
        blk = T.Cast("int64", by) * g_G + T.Cast("int64", bx % g_G)
        nt = T.Cast("int64", bx // g_G)
        if T.tvm_thread_invariant(blk < T.Cast("int64", num_blocks[0])):
            e = T.Cast("int64", block_expert[blk])
            # the ring starts at the first 1024-byte boundary of the dynamic shared memory
            base = (T.cuda.cvta_generic_to_shared(ring.access_ptr("rw")) + T.uint32(ALIGN - 1)) \
                & T.uint32(0xFFFFFFFF - (ALIGN - 1))
            # this thread's A rows (their start in a): gathered tokens (up) or the block's rows (down)
            for i in T.unroll(g_A_PER):
                if up:
                    arow[i] = T.min(T.Cast("int64", sorted_ids[blk * g_BM + (i * g_TH + tx) // ROW_CHUNKS]),
                                    n_slots - 1) // g_K
                else:
                    arow[i] = blk * g_BM + (i * g_TH + tx) // ROW_CHUNKS
            for j in T.unroll(g_ACC):
                acc[j] = T.float32(0)
            for p in T.unroll(g_S - 2):  # prologue: the first STAGES - 2 steps in flight
                if p < g_nk:
                    _load_step(p, p, base, a, w, e, nt, arow, tx, g_A_PER, g_B_PER, g_TH, g_BROW, g_A_BYTES,
                               g_STAGE, g_ATOM_BYTES)
                T.ptx.cp.async_.commit_group()
            for k in range(g_nk):
                T.ptx.cp.async_.wait_group(g_S - 3)  # step k has landed (this thread's copies)
                T.ptx.fence.proxy.async_.shared__cta()  # ... and is visible to the tensor cores
                # every thread's copies of step k are in; every warpgroup's MMAs of step k - 2 are done
                # (each waited for all but its last group before coming here): step k - 2's buffer is free
                T.tvm_storage_sync("shared")
                if k + (g_S - 2) < g_nk:
                    _load_step(k + (g_S - 2), (k + (g_S - 2)) % g_S, base, a, w, e, nt, arow, tx, g_A_PER,
                               g_B_PER, g_TH, g_BROW, g_A_BYTES, g_STAGE, g_ATOM_BYTES)
                T.ptx.cp.async_.commit_group()
                T.ptx.wgmma.fence.sync.aligned()
                for ks in T.unroll(BK // MMA_K):
                    g_mma(*[acc[j] for j in range(g_ACC)],
                          _desc(base + T.Cast("uint32", (k % g_S) * g_STAGE + (tx // WARPGROUP) * WG_ROWS * ROW_BYTES
                                              + ks * MMA_K * 2), 16, SWIZZLE_ROWS * ROW_BYTES),
                          _desc(base + T.Cast("uint32", (k % g_S) * g_STAGE + g_A_BYTES + ks * MMA_K * ROW_BYTES),
                                g_ATOM_BYTES, SWIZZLE_ROWS * ROW_BYTES),
                          True, 1, 1, 0, 1)
                T.ptx.wgmma.commit_group.sync.aligned()
                T.ptx.wgmma.wait_group.sync.aligned(1)  # step k's MMAs run on while step k + 1 starts
            T.ptx.wgmma.wait_group.sync.aligned(0)
            for j in T.unroll(g_ACC):  # the accumulators are read only after the last MMA (no hoisting)
                T.cuda.func_call("moegen_fence_acc", acc[j], source_code=FENCE_ACC)
            # epilogue on the registers: accumulator j is row 16 * warp + lane / 4 + 8 * (j % 4 / 2) of
            # the warpgroup's 64, column 8 * (j / 4) + 2 * (lane % 4) + j % 2
            if not up:
                for h in T.unroll(2):
                    tw[h] = topk_weights[
                        T.min(T.Cast("int64", sorted_ids[blk * g_BM + _row(tx, h)]), n_slots - 1) // g_K,
                        T.min(T.Cast("int64", sorted_ids[blk * g_BM + _row(tx, h)]), n_slots - 1) % g_K]
            for j in T.unroll(g_ACC // 2 if g_gated else g_ACC):
                out[blk * g_BM + _row(tx, j % 4 // 2), nt * g_half + _col(tx, j)] = T.Cast(
                    g_out_dt, _value(g_kind, acc, bias, tw, e, nt, tx, j, g_ACC // 2, g_half, g_bias, g_act, g_alpha,
                                     g_limit))

    return gemm


def _value(kind, acc, bias, tw, e, nt, tx, j, acc_half, half, with_bias, act, alpha, limit):
    """The fp32 output of accumulator j. gated: the activation of gate column c and up column c + BN/2
    (accumulators j and j + acc_half); up: the activation of column c; down: (sum + bias) x the routing
    weight of its row."""
    def biased(jj, c):
        return acc[jj] + (T.Cast("float32", bias[e, nt, c]) if with_bias else T.float32(0))

    if kind == "gated":
        return _act(act, biased(j, _col(tx, j)), biased(j + acc_half, half + _col(tx, j)), alpha, limit)
    if kind == "up":
        return _act(act, biased(j, _col(tx, j)), None, alpha, limit)
    return biased(j, _col(tx, j)) * tw[j % 4 // 2]


def _row(tx, h):
    """Row of the block held by thread tx in accumulator half h (0: lane / 4, 1: lane / 4 + 8)."""
    return (tx // WARPGROUP) * WG_ROWS + (tx % WARPGROUP) // 32 * 16 + (tx % 32) // 4 + 8 * h


def _col(tx, j):
    """Column of the tile held by thread tx in accumulator j."""
    return 8 * (j // 4) + 2 * (tx % 4) + j % 2


@T.macro
def _load_step(k, stage, base, a, w, e, nt, arow, tx, A_PER, B_PER, TH, BROW, A_BYTES, STAGE, ATOM_BYTES):
    """cp.async of reduction step k into ring buffer `stage`: this thread's A and B chunks."""
    for i in T.unroll(A_PER):
        T.ptx.cp.async_.cg.shared.global_(
            base + T.Cast("uint32", stage * STAGE + (i * TH + tx) // ROW_CHUNKS * ROW_BYTES
                          + T.bitwise_xor((i * TH + tx) % ROW_CHUNKS, (i * TH + tx) // ROW_CHUNKS % SWIZZLE_ROWS)
                          * CHUNK_BYTES),
            T.address_of(a[arow[i], T.Cast("int64", k) * BK + (i * TH + tx) % ROW_CHUNKS * CHUNK]), CHUNK_BYTES)
    for i in T.unroll(B_PER):
        T.ptx.cp.async_.cg.shared.global_(
            base + T.Cast("uint32", stage * STAGE + A_BYTES + (i * TH + tx) % BROW // ROW_CHUNKS * ATOM_BYTES
                          + (i * TH + tx) // BROW * ROW_BYTES
                          + T.bitwise_xor((i * TH + tx) % BROW % ROW_CHUNKS, (i * TH + tx) // BROW % SWIZZLE_ROWS)
                          * CHUNK_BYTES),
            T.address_of(w[e, nt, T.Cast("int64", k) * BK + (i * TH + tx) // BROW, (i * TH + tx) % BROW * CHUNK]),
            CHUNK_BYTES)


def experts_up_wgmma_func(s: ExpertShapes, tile: WgmmaTile):
    """experts_up_func's contract (stage_operands, grid_blocks) on wgmma."""
    return _wgmma_gemm_func(s, tile, True, s.dtype)


def experts_down_wgmma_func(s: ExpertShapes, tile: WgmmaTile, y_dtype: str = "float32"):
    """experts_down_func's contract (stage_operands, grid_blocks) on wgmma."""
    return _wgmma_gemm_func(s, tile, False, y_dtype)
