"""FastLinear: one GEMM of engine_fast, cuBLAS for dense weights (the Triton GEMV of
twinfer_kernels/dense_gemv.py for one row where it measured faster) and the Triton quantized GEMMs of
twinfer_kernels/quant_matmul.py for quantized ones (repacked once, at load time)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from twinfer.quant import QuantizedWeight
from twinfer.weights import ModelWeights, WeightsError
from twinfer_kernels.dense_gemv import dense_gemv
from twinfer_kernels.int8_activations import QuantizedActivation
from twinfer_kernels.quant_matmul import PreparedQuantWeight, prepare_quant_weight, quant_linear


@dataclass
class FastLinear:
    """y = x W^T + b, W dense [N, K] or quantized."""

    weight: torch.Tensor | None
    quantized: PreparedQuantWeight | None
    bias: torch.Tensor | None = None
    input_perm: torch.Tensor | None = None  # act-order: gather x's columns into group order
    row_gemv: bool = False  # one row of x: dense_gemv instead of cuBLAS (see gemv_beats_cublas)

    @property
    def nbytes(self) -> int:
        """Bytes a forward pass reads for the weight (packed codes and scales if quantized)."""
        if self.quantized is None:
            return self.weight.numel() * self.weight.element_size()
        return self.quantized.nbytes

    @property
    def takes_int8(self) -> bool:
        """Whether the input may come as per-token int8 (a W8A8 weight): the kernel before
        then quantizes it (elementwise.rms_norm_int8 / silu_and_mul_int8)."""
        return self.quantized is not None and self.quantized.act_bits == 8

    def __call__(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        if isinstance(x, QuantizedActivation):
            return quant_linear(x, self.quantized, self.bias)  # W8A8: no act-order gather
        if self.quantized is None:
            if self.row_gemv and x.shape[0] == 1:
                return dense_gemv(x, self.weight, self.bias)
            return F.linear(x, self.weight, self.bias)
        if self.input_perm is not None:
            x = x[:, self.input_perm]
        return quant_linear(x, self.quantized, self.bias)

    def gemv(self, x: torch.Tensor, *, norm_weight: torch.Tensor | None = None,
             eps: float = 1e-6, silu: bool = False, input_perm: torch.Tensor | None = None,
             residual: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
        """One row of x through the one-row GEMV (dense_gemv, or quant_linear's for a
        weight-only quantized weight) with the ops around it fused: the input is RMSNorm(x) *
        norm_weight or silu(gate) * up, its columns gathered through ``input_perm``
        (act-order, quantized only), and ``residual`` added to the output."""
        if self.quantized is None:
            if input_perm is not None:
                raise ValueError("input_perm (an act-order gather) is for quantized linears")
            return dense_gemv(x, self.weight, self.bias, norm_weight=norm_weight, eps=eps,
                              silu=silu, residual=residual, pdl=pdl)
        return quant_linear(x, self.quantized, self.bias, norm_weight=norm_weight, eps=eps,
                            silu=silu, input_perm=input_perm, residual=residual, pdl=pdl)

    def permute_outputs(self, perm: torch.Tensor) -> None:
        """Reorder the output features, y[:, j] <- y[:, perm[j]] (weight rows, scales, zeros
        and bias alike), so that a following act-order linear gets its input in group order
        without a gather."""
        if self.quantized is None:
            self.weight = self.weight[perm].contiguous()
        else:
            q = self.quantized
            self.quantized = dataclasses.replace(
                q, qweight=q.qweight[perm].contiguous(), scales=q.scales[perm].contiguous(),
                zeros=None if q.zeros is None else q.zeros[perm].contiguous())
        if self.bias is not None:
            self.bias = self.bias[perm].contiguous()


def gemv_beats_cublas(n: int, k: int, device: torch.device) -> bool:
    """Whether dense_gemv beats cuBLAS for one row of x and an [n, k] weight: o_proj-sized
    weights, where cuBLAS splits K and reduces in a second kernel (H200: 13.1 against 15.2 us
    at 4096 x 4096; even at the fused qkv and above, so cuBLAS keeps those)."""
    return device.type == "cuda" and n * k <= 4096 * 4096


def build_fast_linear(weights: ModelWeights, prefixes: list[str], device: torch.device,
                      dtype: torch.dtype, bias: bool = False) -> FastLinear:
    """One FastLinear computing the linears ``prefixes`` side by side (outputs concatenated)."""
    def load(name: str) -> torch.Tensor:
        return weights.get(name).to(device=device, dtype=dtype, copy=True)

    b = torch.cat([load(p + ".bias") for p in prefixes]).contiguous() if bias else None
    quantized = [weights.quantized_linear(p) for p in prefixes]
    if all(q is None for q in quantized):
        w = torch.cat([load(p + ".weight") for p in prefixes]).contiguous()
        return FastLinear(w, None, b, row_gemv=gemv_beats_cublas(*w.shape, device))
    if any(q is None for q in quantized):
        raise WeightsError(f"{weights.source}: {', '.join(prefixes)} mix quantized and dense "
                           "weights; engine_fast fuses them into one GEMM")
    try:
        fused = QuantizedWeight.concat(quantized, prefixes[0])
    except ValueError as e:
        raise WeightsError(f"{weights.source}: {e}") from e
    fused, perm = fused.with_contiguous_groups()
    return FastLinear(None, prepare_quant_weight(fused.to(device), dtype), b,
                      None if perm is None else perm.to(device))
