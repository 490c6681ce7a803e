"""The canonical quantized linear: one container for every scheme twinfer serves.

    W[o, i] = (codes[o, i] - zeros[o, g(i)]) * scales[o, g(i)],   g(i) = g_idx[i] or i // group_size

``codes`` are unsigned integers in [0, 2**bits) held in uint8 [out, in] (unpacked: packing is a
checkpoint concern, see ``twinfer.quant_formats``); ``scales`` are float32 [out, num_groups]
holding exactly the values the checkpoint stores (fp16-representable); ``zeros`` are the integer
zero points as uint8 [out, num_groups] (symmetric schemes use 2**(bits-1)). Per-channel
quantization is one group spanning the whole row (group_size == in_features).

``act_bits == 8`` marks W8A8: activations are quantized per token, dynamically, to int8 with a
symmetric absmax scale; the weight is then symmetric int8 (zeros all 128).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantScheme:
    """What a user asks for: weight bits, group size (-1 = per output channel), symmetry,
    activation bits (16 = weight-only; 8 = dynamic per-token int8)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    act_bits: int = 16

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1, got {self.group_size}")
        if self.act_bits not in (8, 16):
            raise ValueError(f"act_bits must be 8 or 16, got {self.act_bits}")
        if self.act_bits == 8 and not (self.bits == 8 and self.sym and self.group_size == -1):
            raise ValueError("8-bit activations need symmetric per-channel 8-bit weights "
                             "(--wbits 8 --sym --group-size -1)")

    @classmethod
    def parse(cls, text: str) -> QuantScheme:
        """``w4a16``, ``w4a16-g64``, ``w4a16-g128-sym``, ``w8a16``, ``w8a8`` -> a scheme.

        Defaults follow common practice: 8-bit weights per output channel and symmetric,
        4-bit weights in asymmetric groups of 128.
        """
        m = re.fullmatch(r"w(\d+)a(\d+)(?:-g(\d+|-1))?(?:-(sym|asym))?", text.strip().lower())
        if m is None:
            raise ValueError(f"quantization scheme must look like w4a16, w4a16-g64, "
                             f"w4a16-g128-sym, w8a16 or w8a8; got {text!r}")
        bits, act_bits = int(m[1]), int(m[2])
        group = int(m[3]) if m[3] else (-1 if bits == 8 else 128)
        sym = m[4] == "sym" if m[4] else bits == 8
        return cls(bits, group, sym, act_bits)

    @property
    def name(self) -> str:
        """w4a16-g128-asym style label used in reports and file names of caches."""
        g = "" if self.group_size == -1 else f"-g{self.group_size}"
        return f"w{self.bits}a{self.act_bits}{g}-{'sym' if self.sym else 'asym'}"

    def group_size_for(self, in_features: int, layer: str) -> int:
        """The effective group size for a layer, or an error naming the layer."""
        if self.group_size == -1:
            return in_features
        if in_features % self.group_size:
            raise ValueError(f"{layer}: in_features {in_features} is not a multiple of group "
                             f"size {self.group_size}; choose a group size that divides it")
        return self.group_size


@dataclass
class QuantizedWeight:
    """A linear's weight in the canonical layout (see the module docstring)."""

    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # float32 [N, G]
    zeros: torch.Tensor  # uint8 [N, G]
    bits: int
    group_size: int  # K for per-channel
    act_bits: int = 16
    g_idx: torch.Tensor | None = None  # int32 [K]; None means i // group_size

    def group_index(self) -> torch.Tensor:
        """int64 [K]: the group of each input channel."""
        if self.g_idx is not None:
            return self.g_idx.long()
        K = self.codes.shape[1]
        return torch.arange(K, device=self.codes.device) // self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [N, K] this container stands for."""
        N, K = self.codes.shape
        if self.g_idx is None:  # contiguous groups: broadcast instead of gathering
            G = self.scales.shape[1]
            codes = self.codes.view(N, G, K // G).to(dtype)
            w = (codes - self.zeros.unsqueeze(-1).to(dtype)) * self.scales.unsqueeze(-1).to(dtype)
            return w.view(N, K)
        g = self.group_index()
        w = (self.codes.float() - self.zeros.float()[:, g]) * self.scales.float()[:, g]
        return w.to(dtype)

    @staticmethod
    def concat(parts: list[QuantizedWeight], name: str = "linear") -> QuantizedWeight:
        """Stack weights along the output dimension (fused QKV / gate-up), which must agree
        on bits, group size, activation bits and act-order group index."""
        first = parts[0]
        for p in parts[1:]:
            if (p.bits, p.group_size, p.act_bits) != (first.bits, first.group_size,
                                                      first.act_bits):
                raise ValueError(f"{name}: cannot fuse linears quantized differently")
            if (p.g_idx is None) != (first.g_idx is None) or (
                    p.g_idx is not None and not torch.equal(p.g_idx, first.g_idx)):
                raise ValueError(f"{name}: cannot fuse linears with different act-order")
        return QuantizedWeight(torch.cat([p.codes for p in parts]),
                               torch.cat([p.scales for p in parts]),
                               torch.cat([p.zeros for p in parts]), first.bits,
                               first.group_size, first.act_bits, first.g_idx)

    def with_contiguous_groups(self) -> tuple[QuantizedWeight, torch.Tensor | None]:
        """Act-order weights with input channels sorted by group, and the permutation the
        activations' columns need (x[:, perm]); (self, None) when groups are contiguous."""
        if self.g_idx is None:
            return self, None
        perm = torch.argsort(self.g_idx.long(), stable=True)
        return QuantizedWeight(self.codes[:, perm].contiguous(), self.scales, self.zeros,
                               self.bits, self.group_size, self.act_bits), perm

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(
            self.codes.to(device), self.scales.to(device), self.zeros.to(device), self.bits,
            self.group_size, self.act_bits, None if self.g_idx is None else self.g_idx.to(device))


def compute_qparams(w_min: torch.Tensor, w_max: torch.Tensor, bits: int, sym: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points for value ranges [w_min, w_max] (any matching shapes).

    Symmetric: scale = absmax / (2**(bits-1) - 1), zero = 2**(bits-1), so the codes use
    [1, 2**bits - 1] and 0 maps exactly to the zero point. Asymmetric: the range always
    includes 0; scale = (max - min) / (2**bits - 1), zero = round(-min / scale). Scales are
    rounded to fp16 because that is what checkpoints store.
    """
    qmax = 2 ** bits - 1
    if sym:
        absmax = torch.maximum(w_min.abs(), w_max.abs())
        scale = absmax / (2 ** (bits - 1) - 1)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        w_min = torch.clamp(w_min, max=0)
        w_max = torch.clamp(w_max, min=0)
        scale = (w_max - w_min) / qmax
        zero = None
    # An all-zero group gets a tiny scale: fp16's smallest subnormal, since a smaller one
    # would round to 0 in fp16 and make its codes 0 / 0.
    scale = scale.clamp(min=2 ** -24).half().float()
    if zero is None:
        zero = torch.round(-w_min / scale).clamp(0, qmax)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
                   ) -> torch.Tensor:
    """round(w / scale) + zero, clamped to [0, 2**bits): float, same shape as w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)


def quantize_rtn(weight: torch.Tensor, scheme: QuantScheme, layer: str = "weight"
                 ) -> QuantizedWeight:
    """Round-to-nearest quantization of a dense weight [N, K], per group of input channels."""
    N, K = weight.shape
    gs = scheme.group_size_for(K, layer)
    w = weight.float().reshape(N, K // gs, gs)
    w_min, w_max = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale, zero = compute_qparams(w_min, w_max, scheme.bits, scheme.sym)
    codes = quantize_codes(w, scale, zero, scheme.bits)
    return QuantizedWeight(codes=codes.reshape(N, K).to(torch.uint8),
                           scales=scale.squeeze(-1), zeros=zero.squeeze(-1).to(torch.uint8),
                           bits=scheme.bits, group_size=gs, act_bits=scheme.act_bits)


def fake_quantize(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """quantize_rtn then dequantize: the weight a quantized model effectively uses."""
    return quantize_rtn(weight, scheme).dequantize(weight.dtype)


def quantize_activations_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row: x ≈ x_q * scale. Returns (int8 [M, K], float32 [M, 1])."""
    scale = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    x_q = torch.clamp(torch.round(x.float() / scale), -127, 127).to(torch.int8)
    return x_q, scale
