"""Small Triton helpers shared by the kernels of this package."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``tl.dot``, exact in fp32 when ``IEEE``: fp32 inputs would run as tf32 on the GPU by default,
    and the interpreter tests need exact fp32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)
