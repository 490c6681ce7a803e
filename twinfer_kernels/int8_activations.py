"""Per-token int8 activations for W8A8 linears: what a kernel in front of one hands it.

``quantize_row`` rounds a row exactly as ``twinfer.quant.quantize_activations_per_token``
(absmax / 127, IEEE division, round half to even, clamp to +-127). quant_matmul's
``quantize_rows`` uses it alone; RMSNorm and SiLU-and-mul (elementwise.py) can end with it, so
the int8 row leaves the kernel that made the fp16 one and a W8A8 prefill skips a read and write
of every activation (H200, 2,048 tokens: 128 separate quantize launches cost 2.5 ms of 35).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class QuantizedActivation:
    """x [M, K] as int8 values with one float32 scale per row: x ~= values * scales[:, None]."""

    values: torch.Tensor  # int8 [M, K]
    scales: torch.Tensor  # float32 [M]
    dtype: torch.dtype  # the dtype x had, which the linear's output keeps

    @staticmethod
    def empty(rows: int, cols: int, dtype: torch.dtype,
              device: torch.device) -> QuantizedActivation:
        return QuantizedActivation(torch.empty(rows, cols, dtype=torch.int8, device=device),
                                   torch.empty(rows, dtype=torch.float32, device=device), dtype)


@triton.jit
def quantize_row(x):
    """x: one whole row in float32 (padding lanes 0) -> (int8 codes, float32 scale)."""
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), 0), 1e-8), 127.0)
    v = tl.math.div_rn(x, scale)  # IEEE division, as torch does
    v = (v + 12582912.0) - 12582912.0  # 1.5 * 2**23: rounds half to even, like torch.round
    return tl.minimum(tl.maximum(v, -127.0), 127.0).to(tl.int8), scale
