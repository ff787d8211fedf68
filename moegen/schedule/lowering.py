"""Lowering tweaks our CPU schedules depend on, as a named TVM TIR pipeline.

TVM 0.27's LowerTVMBuiltin turns every `local` allocation into a TVMBackendAllocWorkspace call, even a
BM x BN register tile of 128 bytes. LLVM then cannot keep the accumulator in registers (a workspace
pointer may alias the inputs inside a parallel closure): every FMA round-trips memory, measured 3-10x
slower on the expert GEMMs. Allocations of constant size up to STACK_LIMIT bytes are annotated with
TVM's own `disable_lower_builtin`, so they stay stack allocas that LLVM promotes to registers.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

PIPELINE = "moegen-cpu"
STACK_LIMIT = 64 * 1024  # bytes; TVM's pool threads have the default 8 MiB stacks


def _stack_tile(stmt):
    buf = stmt.buffer
    if buf.scope() != "local" or not all(isinstance(s, tirx.IntImm) for s in buf.shape):
        return stmt
    nbytes = tvm.runtime.DataType(str(buf.dtype)).bits // 8
    for s in buf.shape:
        nbytes *= int(s.value)
    if nbytes > STACK_LIMIT:
        return stmt
    ann = dict(stmt.annotations or {})
    ann["disable_lower_builtin"] = tirx.IntImm("bool", 1)
    return tirx.AllocBuffer(buf, ann, stmt.span)


@tirx.transform.prim_func_pass(opt_level=0, name="moegen.StackLocalTiles")
def stack_local_tiles(func, mod, ctx):
    return func.with_body(tvm_ffi.structural_map(func.body, (tirx.AllocBuffer, _stack_tile)))


def _pipeline():
    from tvm.s_tir import pipeline as s_pipeline

    main, finalize_host, finalize_device = s_pipeline.default_s_tir_pipeline()
    return main, lambda: tvm.transform.Sequential([stack_local_tiles, finalize_host()]), finalize_device


def register() -> str:
    """Register the pipeline with TVM (idempotent) and return its name for tvm.compile(tir_pipeline=...)."""
    from tvm.tirx import compilation_pipeline

    compilation_pipeline.PIPELINE_MAP[PIPELINE] = _pipeline
    return PIPELINE
