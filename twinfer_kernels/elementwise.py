"""Row-wise fused ops: RMSNorm with residual add, and SiLU-and-multiply; each can hand a W8A8
linear its input as per-token int8 (``rms_norm_int8``, ``silu_and_mul_int8``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from twinfer_kernels.int8_activations import QuantizedActivation, quantize_row
from twinfer_kernels.pdl import launch_options, pdl_start


@triton.jit
def _residual_sum(x_ptr, residual_ptr, row, stride_x, stride_r, cols, mask,
                  HAS_RESIDUAL: tl.constexpr, DTYPE: tl.constexpr):
    """x + residual at columns ``cols``, rounded to the model dtype as the unfused code does."""
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    return x.to(DTYPE)


@triton.jit
def _store_row(out_ptr, scale_ptr, row, stride_o, y, mask, INT8: tl.constexpr):
    """A whole output row [BLOCK]: as it is, or (INT8) as per-token int8 codes and a scale,
    rounded from the model-dtype values exactly as quantize_rows would round them."""
    cols = tl.arange(0, y.shape[0])
    if INT8:
        q, scale = quantize_row(tl.where(mask, y.to(tl.float32), 0.0))
        tl.store(out_ptr + row * stride_o + cols, q, mask=mask)
        tl.store(scale_ptr + row, scale)
    else:
        tl.store(out_ptr + row * stride_o + cols, y, mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, perm_ptr, out_ptr, scale_ptr,
                     residual_out_ptr, eps, stride_x, stride_r, stride_o, stride_ro, N,
                     HAS_RESIDUAL: tl.constexpr, HAS_PERM: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr, INT8: tl.constexpr):
    pdl_start(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    dtype = residual_out_ptr.dtype.element_ty
    x = _residual_sum(x_ptr, residual_ptr, row, stride_x, stride_r, cols, mask, HAS_RESIDUAL,
                      dtype)
    tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    if HAS_PERM:  # out[j] = norm[perm[j]]: gathered again (cache-hot) rather than shuffled
        cols = tl.load(perm_ptr + cols, mask=mask, other=0)
        xf = _residual_sum(x_ptr, residual_ptr, row, stride_x, stride_r, cols, mask,
                           HAS_RESIDUAL, dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    y = (xf * rstd).to(dtype) * w
    _store_row(out_ptr, scale_ptr, row, stride_o, y, mask, INT8)


def _rms_norm_launch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     residual: torch.Tensor | None, out_perm: torch.Tensor | None, pdl: bool,
                     out: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """Checks, launches the kernel into ``out`` (and ``scales`` for int8), returns x + residual."""
    if x.dim() != 2 or x.stride(-1) != 1 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm wants x [rows, N] contiguous in N and weight [N]; got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    rows, n = x.shape
    residual_out = torch.empty_like(x)
    res = residual if residual is not None else x
    # One program per row: at decode's few rows the kernel is latency-bound, and more warps
    # (8 for hidden 4096) shorten each row's load-reduce-store chain.
    block = triton.next_power_of_2(n)
    if out_perm is not None and out_perm.shape != (n,):
        raise ValueError(f"out_perm must be [{n}], got {tuple(out_perm.shape)}")
    perm = out_perm if out_perm is not None else weight  # never read without HAS_PERM
    _rms_norm_kernel[(rows,)](x, res, weight, perm, out, scales if scales is not None else out,
                              residual_out, eps, x.stride(0), res.stride(0), out.stride(0),
                              residual_out.stride(0), n,
                              HAS_RESIDUAL=residual is not None,
                              HAS_PERM=out_perm is not None, BLOCK=block, PDL=pdl,
                              INT8=scales is not None,
                              num_warps=min(16, max(4, block // 512)), **launch_options(pdl))
    return residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, out_perm: torch.Tensor | None = None,
             pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual) over the last dim of x [rows, N]. With
    ``out_perm`` [N] the first is returned with its columns gathered, ``[:, out_perm]`` (the
    input order an act-order linear after the norm wants), without another kernel. ``pdl``:
    launched as a programmatic dependent launch (CUDA sm_90+)."""
    out = torch.empty_like(x)
    return out, _rms_norm_launch(x, weight, eps, residual, out_perm, pdl, out, None)


def rms_norm_int8(x: torch.Tensor, weight: torch.Tensor, eps: float,
                  residual: torch.Tensor | None = None
                  ) -> tuple[QuantizedActivation, torch.Tensor]:
    """rms_norm's two results, the first as per-token int8 for a W8A8 linear: equal to
    ``quantize_rows(rms_norm(...)[0])``, in one kernel."""
    out = QuantizedActivation.empty(*x.shape, x.dtype, x.device)
    return out, _rms_norm_launch(x, weight, eps, residual, None, False, out.values, out.scales)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, scale_ptr, stride_x, stride_o, N, BLOCK: tl.constexpr,
                         PDL: tl.constexpr, INT8: tl.constexpr):
    # INT8: one program holds a whole row (BLOCK >= N), since the scale needs its absmax.
    pdl_start(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0)
    act = (gate * tl.sigmoid(gate)).to(up.dtype)
    if INT8:
        _store_row(out_ptr, scale_ptr, row, stride_o, act * up, mask, True)
    else:
        tl.store(out_ptr + row * stride_o + cols, act * up, mask=mask)


def _half_width(x: torch.Tensor) -> int:
    """N of x [rows, 2N] = [gate | up], which must be contiguous in its columns."""
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"silu_and_mul wants [rows, 2N] contiguous, got {tuple(x.shape)}")
    return x.shape[1] // 2


def silu_and_mul(x: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """x [rows, 2N] = [gate | up] -> silu(gate) * up, [rows, N]. ``pdl`` as in rms_norm."""
    rows, n = x.shape[0], _half_width(x)
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](
            x, out, out, x.stride(0), out.stride(0), n, BLOCK=block, PDL=pdl, INT8=False,
            **launch_options(pdl))
    return out


def silu_and_mul_int8(x: torch.Tensor) -> QuantizedActivation:
    """silu_and_mul(x) as per-token int8 for a W8A8 linear: equal to
    ``quantize_rows(silu_and_mul(x))``, in one kernel."""
    rows, n = x.shape[0], _half_width(x)
    out = QuantizedActivation.empty(rows, n, x.dtype, x.device)
    block = triton.next_power_of_2(n)
    if rows:
        _silu_and_mul_kernel[(rows, 1)](x, out.values, out.scales, x.stride(0),
                                        out.values.stride(0), n, BLOCK=block, PDL=False,
                                        INT8=True, num_warps=min(16, max(4, block // 1024)))
    return out
