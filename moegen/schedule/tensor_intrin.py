"""Tensor-core intrinsics for the CUDA schedules: ldmatrix + mma.sync.m16n8k16, fp16 and bf16 operands,
fp32 accumulate. TVM 0.27 registers fp16/int8/fp8 versions only (tvm.s_tir.tensor_intrin.cuda, whose
import also takes ~30 s on the build box); these are the same definitions with the 16-bit input dtype
as a parameter, registered on first use under moegen's own names.

Shape legend (one warp, one 16x16 output fragment): A 16 x 16 (rows x k), B 16 x 16 (k x cols), C 16 x 16
fp32. In registers a 16x16 fragment is [32 threads, 8 values] in the ldmatrix layout below; one
"m16n8k16" tensor-core instruction does half of the 16 columns, so an mma intrinsic issues two.

Names registered (dtype in {float16, bfloat16}):
    moegen_ldmatrix_a_<dtype>[_<scope>]  shared [16, 16] row-major -> warp [32, 8]  (ldmatrix.x4)
    moegen_ldmatrix_b_<dtype>[_<scope>]  shared [16, 16] k x n     -> warp [32, 8]  (ldmatrix.x4.trans)
                                         (suffix _shared_dyn for dynamic shared memory)
    moegen_mma_<dtype>_f32      C[i, j] += f32(A[i, k]) * f32(B[k, j])          (2 x mma.sync m16n8k16)
    moegen_mma_fill_f32         C = 0
    moegen_mma_store_f32_<scope> warp [32, 8] -> <scope> [16, 16]
"""

from __future__ import annotations

import tvm_ffi
from tvm.runtime import convert
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

FRAG = 16  # rows, columns and k of one fragment
WARP = 32
LOCAL = FRAG * FRAG // WARP  # values per thread per fragment
HALF = WARP // 2
PTX_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
INPUT_DTYPES = ("float16", "bfloat16")


def frag_layout(i, j):
    """Element (i, j) of a 16x16 fragment -> (thread, value) in the mma/ldmatrix register layout."""
    return 4 * (i % 8) + (j % 8) // 2, 4 * (j // 8) + (i // 8) * 2 + (j % 2)


def frag_layout_4d(*idx):
    """transform_layout map of a [.., R, C] buffer (R, C multiples of 16) into fragments:
    (.., i, j) -> (.., i // 16, j // 16, thread, value)."""
    *lead, i, j = idx
    return (*lead, i // FRAG, j // FRAG, *frag_layout(i % FRAG, j % FRAG))


def _ldmatrix(dtype: str, operand: str, scope: str):
    # A (row-major, rows x k) loads as stored; B (k x n, row-major) loads with .trans so each thread
    # gets pairs along k. Either way thread tx gives the address of row tx % 16, columns 8 * (tx // 16)..
    trans = operand == "B"
    smem_offset = lambda tx, s: s * (tx % HALF) + 8 * (tx // HALF)  # noqa: E731
    li_dt, li_scope = dtype, scope

    @T.prim_func(s_tir=True)
    def desc(warp_h: T.handle, shared_h: T.handle) -> None:
        shared = T.match_buffer(shared_h, (FRAG, FRAG), li_dt, align=64, offset_factor=FRAG, scope=li_scope)
        warp = T.match_buffer(warp_h, (WARP, LOCAL), li_dt, align=64, offset_factor=FRAG, scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:FRAG, 0:FRAG])
            T.writes(warp[0:WARP, 0:LOCAL])
            for a0, a1 in T.grid(FRAG, FRAG):
                with T.sblock("shared_warp"):
                    v0, v1 = T.axis.remap("SS", [a0, a1])
                    T.reads(shared[v0, v1])
                    th, lo = T.meta_var(frag_layout(v0, v1))
                    T.writes(warp[th, lo])
                    warp[th, lo] = shared[v0, v1]

    @T.prim_func(s_tir=True)
    def impl(warp_h: T.handle, shared_h: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        shared = T.match_buffer(shared_h, (FRAG, FRAG), li_dt, align=64, offset_factor=FRAG, scope=li_scope,
                                strides=[s0, s1])
        warp = T.match_buffer(warp_h, (WARP, LOCAL), li_dt, align=64, offset_factor=FRAG, scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:FRAG, 0:FRAG])
            T.writes(warp[0:WARP, 0:LOCAL])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                T.evaluate(T.ptx_legacy.ldmatrix(trans, 4, ".b16", warp.data, warp.elem_offset + convert(LOCAL) * tx,
                                                 shared.access_ptr("r"), smem_offset(tx, s0), dtype=li_dt))

    return desc, impl


def _mma(dtype: str):
    mm_dt, ab = dtype, PTX_DTYPE[dtype]

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, LOCAL), mm_dt, align=64, offset_factor=FRAG, scope="warp")
        B = T.match_buffer(b, (WARP, LOCAL), mm_dt, align=64, offset_factor=FRAG, scope="warp")
        C = T.match_buffer(c, (WARP, LOCAL), "float32", align=64, offset_factor=FRAG, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:LOCAL], A[0:WARP, 0:LOCAL], B[0:WARP, 0:LOCAL])
            T.writes(C[0:WARP, 0:LOCAL])
            for i, j, k in T.grid(FRAG, FRAG, FRAG):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    tc, lc = T.meta_var(frag_layout(vi, vj))
                    ta, la = T.meta_var(frag_layout(vi, vk))
                    tb, lb = T.meta_var(frag_layout(vk, vj))
                    T.reads(C[tc, lc], A[ta, la], B[tb, lb])
                    T.writes(C[tc, lc])
                    C[tc, lc] += T.Cast("float32", A[ta, la]) * T.Cast("float32", B[tb, lb])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, LOCAL), mm_dt, align=64, offset_factor=FRAG, scope="warp")
        B = T.match_buffer(b, (WARP, LOCAL), mm_dt, align=64, offset_factor=FRAG, scope="warp")
        C = T.match_buffer(c, (WARP, LOCAL), "float32", align=64, offset_factor=FRAG, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:LOCAL], A[0:WARP, 0:LOCAL], B[0:WARP, 0:LOCAL])
            T.writes(C[0:WARP, 0:LOCAL])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                for half in T.unroll(2):  # columns 0-7, then 8-15 of the fragment
                    T.evaluate(T.ptx_legacy.mma(
                        "m16n8k16", "row", "col", ab, ab, "fp32",
                        A.data, A.elem_offset + tx * LOCAL,
                        B.data, B.elem_offset + tx * LOCAL + half * (LOCAL // 2),
                        C.data, C.elem_offset + tx * LOCAL + half * (LOCAL // 2),
                        False, dtype="float32"))

    return desc, impl


def _fill():
    @T.prim_func(s_tir=True)
    def desc(a: T.handle) -> None:
        C = T.match_buffer(a, (WARP, LOCAL), "float32", scope="warp")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:WARP, 0:LOCAL])
            for i0, i1 in T.grid(FRAG, FRAG):
                with T.sblock("C_warp"):
                    i, j = T.axis.remap("SS", [i0, i1])
                    th, lo = T.meta_var(frag_layout(i, j))
                    T.reads()
                    T.writes(C[th, lo])
                    C[th, lo] = T.float32(0)

    @T.prim_func(s_tir=True)
    def impl(a: T.handle) -> None:
        C = T.match_buffer(a, (WARP, LOCAL), "float32", scope="warp", offset_factor=1)
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:WARP, 0:LOCAL])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                T.evaluate(T.cuda.mma_fill_legacy(LOCAL, C.data, C.elem_offset, dtype="float32"))

    return desc, impl


def _store(scope: str):
    st_scope = scope

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        Cw = T.match_buffer(a, (WARP, LOCAL), "float32", scope="warp")
        C = T.match_buffer(c, (FRAG, FRAG), "float32", scope=st_scope)
        with T.sblock("root"):
            T.reads(Cw[0:WARP, 0:LOCAL])
            T.writes(C[0:FRAG, 0:FRAG])
            for i0, i1 in T.grid(FRAG, FRAG):
                with T.sblock("C_warp"):
                    v0, v1 = T.axis.remap("SS", [i0, i1])
                    th, lo = T.meta_var(frag_layout(v0, v1))
                    T.reads(Cw[th, lo])
                    T.writes(C[v0, v1])
                    C[v0, v1] = Cw[th, lo]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        Cw = T.match_buffer(a, (WARP, LOCAL), "float32", scope="warp", offset_factor=1)
        C = T.match_buffer(c, (FRAG, FRAG), "float32", scope=st_scope, offset_factor=1, strides=[s0, s1])
        with T.sblock("root"):
            T.reads(Cw[0:WARP, 0:LOCAL])
            T.writes(C[0:FRAG, 0:FRAG])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                T.evaluate(T.cuda.mma_store_legacy(FRAG, FRAG, C.access_ptr("w"), Cw.data, Cw.elem_offset, s0,
                                                   dtype="float32"))

    return desc, impl


SHARED_SCOPES = ("shared", "shared.dyn")


def names(dtype: str, scope: str = "shared") -> dict[str, str]:
    """The intrinsic names a tensor-core GEMM of `dtype` inputs uses, its operands and accumulator tile
    in shared memory of `scope` (static "shared" or "shared.dyn"); registered on first call."""
    if dtype not in INPUT_DTYPES:
        raise ValueError(f"tensor cores take {' | '.join(INPUT_DTYPES)} inputs, not {dtype}")
    if scope not in SHARED_SCOPES:
        raise ValueError(f"operands come from {' | '.join(SHARED_SCOPES)} memory, not {scope}")
    sfx = "" if scope == "shared" else "_" + scope.replace(".", "_")
    n = {"load_a": f"moegen_ldmatrix_a_{dtype}{sfx}", "load_b": f"moegen_ldmatrix_b_{dtype}{sfx}",
         "compute": f"moegen_mma_{dtype}_f32", "init": "moegen_mma_fill_f32",
         "store": f"moegen_mma_store_f32_{scope.replace('.', '_')}"}
    _register(dtype, scope, n)
    return n


_done: set[tuple[str, str]] = set()


def _register(dtype: str, scope: str, n: dict[str, str]) -> None:
    if (dtype, scope) in _done:
        return
    # the warp-memory lowering looks this layout up by name (TVM's own module registers it on import)
    key = "tirx.index_map.shared_16x16_to_ldmatrix_32x8_layout"
    if tvm_ffi.get_global_func(key, allow_missing=True) is None:
        tvm_ffi.register_global_func(key, lambda ind: convert(list(frag_layout(ind[0], ind[1]))))
    for name, fns in ((n["load_a"], lambda: _ldmatrix(dtype, "A", scope)),
                      (n["load_b"], lambda: _ldmatrix(dtype, "B", scope)),
                      (n["compute"], lambda: _mma(dtype)), (n["init"], _fill),
                      (n["store"], lambda: _store(scope))):
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, *fns())
    _done.add((dtype, scope))
