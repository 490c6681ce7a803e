"""y = x W^T (+ b) for one row of x and a dense fp16 / bf16 weight: the batch-1 decode GEMV,
optionally with the ops around it fused in.

Why not cuBLAS: at one row, cuBLAS streams the large projections at 93-99% of copy bandwidth,
but the fused qkv (6144 x 4096) and o (4096 x 4096) run at 70-75%, and o and down add a
split-K reduction kernel each (H200 profile in bench/RESULTS.md). This kernel gives every
program BLOCK_N whole rows (no split-K, so no second kernel and no float32 partials), keeps a
2-D [BLOCK_N, BLOCK_K] float32 partial that is reduced once after the K loop, and loads the
next K tile before multiplying the current one.

At batch-1 decode the small kernels between the GEMMs (RMSNorm, SiLU-and-mul, the residual
add) cost more in launches than in bytes, so the GEMV can absorb them:
- ``norm_weight``: the input is RMSNorm(x) * norm_weight. Every program computes the row's
  rstd itself (one extra read of a few KB of x from L2, in one load) rather than waiting for a
  separate kernel;
- ``silu``: x is [gate | up] (2K columns) and the input is silu(gate) * up;
- ``residual``: the output is y + residual (the residual stream's add of the next RMSNorm).
Each rounds where the unfused kernels in elementwise.py round (gemv_fusion.py).

``pdl`` (Hopper and later): programmatic dependent launch. The kernel lets the next one launch
as soon as all its programs run, and itself waits for the previous kernel only after issuing
its first weight loads, which depend on nothing earlier: each GEMV's start-up latency then
overlaps the tail of the kernel before it. Every kernel in such a chain waits (gdc_wait)
before reading or writing anything another kernel touches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from twinfer_kernels.gemv_fusion import add_residual, gemv_input, row_rstd
from twinfer_kernels.pdl import launch_options


@triton.jit
def _dense_gemv_kernel(x_ptr, w_ptr, bias_ptr, norm_w_ptr, residual_ptr, out_ptr, N, K, eps,
                       stride_xm, stride_wn, stride_rm, stride_om,
                       HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SILU: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       K_POW2: tl.constexpr, PDL: tl.constexpr):
    row, pid_n = tl.program_id(0), tl.program_id(1)
    dtype = out_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + (offs_n % N)[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + row * stride_xm + offs_k
    # The second operand of each input tile: norm weight (NORM), up half of x (SILU), or x again.
    xb_ptrs = x_ptrs
    if NORM:
        xb_ptrs = norm_w_ptr + offs_k
    if SILU:
        xb_ptrs = x_ptrs + K
    w_next = tl.load(w_ptrs, mask=offs_k[None, :] < K, other=0.0)  # weights: no dependency
    if PDL:
        gdc_wait()
    rstd = 1.0
    if NORM:
        rstd = row_rstd(x_ptr + row * stride_xm, K, eps, K_POW2)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    xa_next = tl.load(x_ptrs, mask=offs_k < K, other=0.0)
    xb_next = xa_next
    if NORM or SILU:
        xb_next = tl.load(xb_ptrs, mask=offs_k < K, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        w, xa, xb = w_next, xa_next, xb_next
        k1 = k0 + BLOCK_K
        w_next = tl.load(w_ptrs + k1, mask=offs_k[None, :] < K - k1, other=0.0)
        xa_next = tl.load(x_ptrs + k1, mask=offs_k < K - k1, other=0.0)
        if NORM or SILU:
            xb_next = tl.load(xb_ptrs + k1, mask=offs_k < K - k1, other=0.0)
        x = gemv_input(xa, xb, rstd, NORM, SILU, dtype)
        acc2 += w.to(tl.float32) * x.to(tl.float32)[None, :]
    if PDL:  # the weights are read: the next kernel may start loading its own
        gdc_launch_dependents()
    acc = tl.sum(acc2, axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    y = add_residual(acc, residual_ptr + row * stride_rm + offs_n, offs_n < N, HAS_RESIDUAL,
                     dtype)
    tl.store(out_ptr + row * stride_om + offs_n, y, mask=offs_n < N)


def row_gemv_tile(n: int, k: int) -> tuple[int, int, int]:
    """(block_n, block_k, num_warps) for an [n, k] weight: the best of 35 tiles per Llama-8B
    projection on an H200 (``python -m bench.row_gemv``; fused variants, RESULTS.md). Few,
    long rows (down) want more warps per row; many short rows (gate/up) more rows per
    program; the 4096-wide ones the longest K tile."""
    if k > n:
        return 8, 512, 8  # down, 4096 x 14336: 36.0 us
    if n >= 4 * k:
        return 16, 256, 4  # gate/up, 28672 x 4096: 62.5 us (8, 512, 8: 66.5)
    return (4 if n > k else 8), 1024, 4  # qkv 18.5 us (8, 512, 8: 20.2); o 12.4 (12.6)


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               block_n: int | None = None, block_k: int | None = None,
               num_warps: int | None = None, *,
               norm_weight: torch.Tensor | None = None, eps: float = 1e-6, silu: bool = False,
               residual: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T (+ bias) for few rows M (one program row per x row), in
    x's dtype, accumulated in float32. Tile parameters left None come from row_gemv_tile.

    ``norm_weight`` [K]: multiply RMSNorm(x) * norm_weight instead of x (eps: the norm's).
    ``silu``: x is [M, 2K] = [gate | up]; multiply silu(gate) * up. ``residual`` [M, N]: return
    x W^T + residual (rounded to x's dtype before the add, as an unfused add would see it).
    ``pdl``: launch as a programmatic dependent launch (CUDA, sm_90+; module docstring)."""
    M = x.shape[0]
    N, K = weight.shape
    if norm_weight is not None and silu:
        raise ValueError("dense_gemv fuses either an RMSNorm or a SiLU-and-mul, not both")
    k_in = 2 * K if silu else K
    if x.dim() != 2 or x.shape[1] != k_in or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"dense_gemv wants x [M, {k_in}] and weight [N, K], both contiguous in "
                         f"K; got {tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    if norm_weight is not None and norm_weight.shape != (K,):
        raise ValueError(f"norm_weight must be [{K}], got {tuple(norm_weight.shape)}")
    if residual is not None and (residual.shape != (M, N) or residual.stride(1) != 1):
        raise ValueError(f"residual must be [{M}, {N}] contiguous in N, got "
                         f"{tuple(residual.shape)}")
    tile = row_gemv_tile(N, K)
    block_n, block_k, num_warps = (v if v is not None else d
                                   for v, d in zip((block_n, block_k, num_warps), tile))
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M:
        _dense_gemv_kernel[(M, triton.cdiv(N, block_n))](
            x, weight, bias if bias is not None else out,
            norm_weight if norm_weight is not None else out,
            residual if residual is not None else out, out, N, K, eps, x.stride(0),
            weight.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            HAS_BIAS=bias is not None, NORM=norm_weight is not None, SILU=silu,
            HAS_RESIDUAL=residual is not None, BLOCK_N=block_n,
            BLOCK_K=min(block_k, triton.next_power_of_2(K)),
            K_POW2=triton.next_power_of_2(K), PDL=pdl, num_warps=num_warps,
            **launch_options(pdl))
    return out
