"""What the one-row GEMVs (dense_gemv.py, quant_matmul.py, half2_gemv.py) fuse around their
dot product at batch-1 decode: an RMSNorm or a SiLU-and-mul in front of it, an act-order
column gather, and the residual add after it.

Each rounds where the unfused kernels of elementwise.py round (the normalized value to the
model dtype, then times the norm weight; silu(gate) to the model dtype, then times up; the
GEMV's output to the model dtype, then plus the residual), so the fused values equal the
unfused ones up to the order of rstd's float32 sum.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_rstd(x_row_ptr, K, eps, K_POW2: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of one row of K values, from one load of the whole row (a
    few KB, cache-hot: every program of a GEMV recomputes it rather than wait for a kernel)."""
    cols = tl.arange(0, K_POW2)
    xs = tl.load(x_row_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(xs * xs, 0) / K + eps)


@triton.jit
def gemv_input(xa, xb, rstd, NORM: tl.constexpr, SILU: tl.constexpr, DTYPE: tl.constexpr):
    """The GEMV's input from its raw loads: xa = x (or gate), xb = the norm weight (or up)."""
    if SILU:
        gate = xa.to(tl.float32)
        return (gate * tl.sigmoid(gate)).to(DTYPE) * xb
    if NORM:
        return (xa.to(tl.float32) * rstd).to(DTYPE) * xb
    return xa


@triton.jit
def gathered_input(x_row_ptr, norm_w_ptr, perm_ptr, cols, K, rstd, NORM: tl.constexpr,
                   SILU: tl.constexpr, PERM: tl.constexpr, DTYPE: tl.constexpr):
    """Input columns ``cols`` of a GEMV whose input is x, RMSNorm(x) * norm_w (NORM) or
    silu(x[:K]) * x[K:] (SILU), each column k taken from column perm[k] (PERM: act-order)."""
    src = cols
    if PERM:
        src = tl.load(perm_ptr + cols)
    xa = tl.load(x_row_ptr + src)
    xb = xa
    if NORM:
        xb = tl.load(norm_w_ptr + src)
    if SILU:
        xb = tl.load(x_row_ptr + K + src)
    return gemv_input(xa, xb, rstd, NORM, SILU, DTYPE)


@triton.jit
def add_residual(acc, residual_ptrs, mask, HAS_RESIDUAL: tl.constexpr, DTYPE: tl.constexpr):
    """The GEMV's float32 result rounded to DTYPE, plus the residual (rounded again)."""
    y = acc.to(DTYPE)
    if HAS_RESIDUAL:
        res = tl.load(residual_ptrs, mask=mask, other=0.0)
        y = (y.to(tl.float32) + res.to(tl.float32)).to(DTYPE)
    return y
