"""y = x W^T (+ b) for one row of x and a dense fp16 / bf16 weight: the batch-1 decode GEMV.

Why not cuBLAS: at one row, cuBLAS streams the large projections at 93-99% of copy bandwidth,
but the fused qkv (6144 x 4096) and o (4096 x 4096) run at 70-75%, and o and down add a
split-K reduction kernel each (H200 profile in bench/RESULTS.md). This kernel gives every
program BLOCK_N whole rows (no split-K, so no second kernel and no float32 partials), keeps a
2-D [BLOCK_N, BLOCK_K] float32 partial that is reduced once after the K loop, and loads the
next K tile before multiplying the current one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dense_gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, N, K, stride_xm, stride_wn, stride_om,
                       HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row, pid_n = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + (offs_n % N)[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + row * stride_xm + offs_k
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    w_next = tl.load(w_ptrs, mask=offs_k[None, :] < K, other=0.0)
    x_next = tl.load(x_ptrs, mask=offs_k < K, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        w, x = w_next, x_next
        k1 = k0 + BLOCK_K
        w_next = tl.load(w_ptrs + k1, mask=offs_k[None, :] < K - k1, other=0.0)
        x_next = tl.load(x_ptrs + k1, mask=offs_k < K - k1, other=0.0)
        acc2 += w.to(tl.float32) * x.to(tl.float32)[None, :]
    acc = tl.sum(acc2, axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty),
             mask=offs_n < N)


def dense_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               block_n: int = 8, block_k: int = 512, num_warps: int = 8) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T (+ bias) for few rows M (one program row per x row), in
    x's dtype, accumulated in float32. Default tile: the H200 sweep's best at 4096 x 4096."""
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"dense_gemv wants x [M, K] and weight [N, K], both contiguous in K; "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M:
        _dense_gemv_kernel[(M, triton.cdiv(N, block_n))](
            x, weight, bias if bias is not None else out, out, N, K, x.stride(0),
            weight.stride(0), out.stride(0), HAS_BIAS=bias is not None, BLOCK_N=block_n,
            BLOCK_K=min(block_k, triton.next_power_of_2(K)), num_warps=num_warps)
    return out
