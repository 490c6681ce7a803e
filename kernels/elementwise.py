"""Row-wise fused ops: RMSNorm with residual add, rotary embedding, SiLU-and-multiply, and
writing new K/V into their cache slots."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, eps,
                     stride_x, stride_r, stride_o, stride_ro, N,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    # The sum in the residual stream is rounded to the model dtype, as the unfused code does.
    x = x.to(out_ptr.dtype.element_ty)
    tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    y = (xf * rstd).to(out_ptr.dtype.element_ty) * w
    tl.store(out_ptr + row * stride_o + cols, y, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual) over the last dim of x [rows, N]."""
    if x.dim() != 2 or x.stride(-1) != 1 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm wants x [rows, N] contiguous in N and weight [N]; got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    rows, n = x.shape
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x)
    res = residual if residual is not None else x
    _rms_norm_kernel[(rows,)](x, res, weight, out, residual_out, eps, x.stride(0),
                              res.stride(0), out.stride(0), residual_out.stride(0), n,
                              HAS_RESIDUAL=residual is not None,
                              BLOCK=triton.next_power_of_2(n))
    return out, residual_out


@triton.jit
def _rotary_kernel(x_ptr, positions_ptr, inv_freq_ptr, stride_t, stride_h,
                   HALF: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, HALF)
    pos = tl.load(positions_ptr + t).to(tl.float32)
    angle = pos * tl.load(inv_freq_ptr + i)
    cos, sin = tl.cos(angle), tl.sin(angle)
    base = x_ptr + t * stride_t + h * stride_h
    x1 = tl.load(base + i).to(tl.float32)
    x2 = tl.load(base + HALF + i).to(tl.float32)
    tl.store(base + i, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty))
    tl.store(base + HALF + i, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty))


def rotary_(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] in place by the angles positions[t] * inv_freq (HF half-split
    layout: pairs are (i, i + D/2))."""
    T, H, D = x.shape
    if x.stride(-1) != 1 or inv_freq.shape != (D // 2,) or inv_freq.dtype != torch.float32:
        raise ValueError("rotary_ wants x [T, H, D] contiguous in D and float32 inv_freq [D/2]")
    if T:
        _rotary_kernel[(T, H)](x, positions, inv_freq, x.stride(0), x.stride(1), HALF=D // 2)
    return x


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0)
    act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, act * up, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [rows, 2N] = [gate | up] -> silu(gate) * up, [rows, N]."""
    rows, two_n = x.shape
    if two_n % 2 or x.stride(-1) != 1:
        raise ValueError(f"silu_and_mul wants [rows, 2N] contiguous, got {tuple(x.shape)}")
    n = two_n // 2
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0),
                                                            n, BLOCK=block)
    return out


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, stride_k, stride_v,
                     stride_kc, stride_vc, N, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:  # slot -1 marks a padding row that must not touch the cache
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        tl.store(k_cache_ptr + slot * stride_kc + cols,
                 tl.load(k_ptr + t * stride_k + cols, mask=mask), mask=mask)
        tl.store(v_cache_ptr + slot * stride_vc + cols,
                 tl.load(v_ptr + t * stride_v + cols, mask=mask), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, Hkv, D] at their slots of the caches [num_blocks, block_size, Hkv, D]."""
    T, Hkv, D = k.shape
    if k_cache.shape[2:] != (Hkv, D) or not k_cache.is_contiguous():
        raise ValueError("cache must be contiguous [num_blocks, block_size, Hkv, D]")
    if k.stride(1) != D or k.stride(2) != 1 or v.stride(1) != D or v.stride(2) != 1:
        raise ValueError("k and v must be contiguous per token")
    if T:
        _write_kv_kernel[(T,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                               Hkv * D, Hkv * D, Hkv * D,
                               BLOCK=triton.next_power_of_2(Hkv * D))
