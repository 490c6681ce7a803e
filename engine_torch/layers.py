"""Building blocks of the reference forward pass: RMSNorm, rotary embedding, linears."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from twinfer.config import ModelConfig
from twinfer.quant import QuantizedWeight, quantize_activations_per_token
from twinfer.weights import ModelWeights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, computed in float32 as Hugging Face does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim // 2], with "linear" or "llama3" scaling applied."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s.rope_type == "linear":
        return inv_freq / s.factor
    if s.rope_type == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
        old_len = s.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / s.low_freq_factor, inv_freq / s.factor, inv_freq)
        smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor -
                                                           s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= old_len / s.high_freq_factor) & (wavelen <= old_len /
                                                              s.low_freq_factor)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [num_tokens, head_dim] for the given positions (angles in float32)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, num_heads, head_dim]; rotates the two halves of each head (HF layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class DenseLinear:
    """y = x W^T + b with a dense weight [out_features, in_features]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QuantLinear:
    """y = x W^T + b with W = (codes - zeros) * scales, dequantized at every call so the
    weight stays quantized in memory. W8A8 (``act_bits == 8``) also rounds x per token to int8
    and multiplies integers: y = (x_q W_q^T) * s_x * s_w, as an int8 kernel does."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        self.weight = weight
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.act_bits == 8:
            x_q, x_scale = quantize_activations_per_token(x.reshape(-1, x.shape[-1]))
            w_int = w.codes.float() - w.zeros.float()  # [N, K] integers in [-127, 127]
            y = (x_q.float() @ w_int.t()) * x_scale * w.scales.t()  # [M, N] * [M, 1] * [1, N]
            y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        return F.linear(x, w.dequantize(x.dtype), self.bias)


Linear = DenseLinear | QuantLinear


def make_linear(weights: ModelWeights, prefix: str, device: torch.device | str,
                dtype: torch.dtype, bias: bool = False) -> DenseLinear | QuantLinear:
    """The one place a checkpoint linear becomes an implementation: dense or quantized."""
    def load(name: str) -> torch.Tensor:
        # A fresh copy: tensors from safetensors may be only 8-byte aligned.
        return weights.get(name).to(device=device, dtype=dtype, copy=True)

    b = load(prefix + ".bias") if bias else None
    quantized = weights.quantized_linear(prefix)
    if quantized is not None:
        return QuantLinear(quantized.to(device), b)
    return DenseLinear(load(prefix + ".weight"), b)
