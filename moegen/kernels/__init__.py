"""TensorIR compute definitions, one module per kernel family (no schedules here).

Every family's shapes are specialised on the spec (E, K, widths, dtype) and keep the token count T
symbolic, so one library serves every batch size. All dimensions are int64: an index such as
tokens * top-k * hidden can pass 2**31 (TVM also needs one index type for a symbolic int64 extent).
"""

import tvm


def token_var(name: str = "T") -> "tvm.tirx.Var":
    """A fresh symbolic token count (created outside the prim_func, as TVMScript needs)."""
    return tvm.tirx.Var(name, "int64")


VECTOR_BYTES = 16  # one 128-bit weight load per thread (the GPU decode kernels)


def vector_elems(dtype: str) -> int:
    """Elements of `dtype` in one VECTOR_BYTES load."""
    return VECTOR_BYTES // (4 if dtype == "float32" else 2)
