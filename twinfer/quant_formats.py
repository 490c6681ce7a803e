"""Checkpoint formats for quantized linears, to and from the canonical ``QuantizedWeight``.

- GPTQ (AutoGPTQ / GPTQModel "gptq" v1, what transformers and vLLM load as ``quant_method:
  gptq``): ``qweight`` int32 [K / (32/bits), N] packing consecutive input channels low bits
  first; ``qzeros`` int32 [G, N / (32/bits)] packing output channels, storing zero - 1 (the
  format's historical quirk); ``scales`` fp16 [G, N]; ``g_idx`` int32 [K].
- AWQ "gemm" (AutoAWQ, ``quant_method: awq``, 4-bit only): ``qweight`` int32 [K, N / 8] packing
  output channels in the interleaved order 0 2 4 6 1 3 5 7; ``qzeros`` int32 [G, N / 8] in
  the same order (zero stored as is); ``scales`` fp16 [G, N].
- compressed-tensors "int-quantized" (llm-compressor's W8A8, ``quant_method:
  compressed-tensors``): ``weight`` int8 [N, K], ``weight_scale`` [N, 1], activations dynamic
  per token.
"""

from __future__ import annotations

from typing import Any

import torch

from twinfer.quant import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FORMATS = ("gptq", "awq", "compressed-tensors")


class QuantFormatError(ValueError):
    """A quantized checkpoint whose tensors or config do not fit its declared format."""


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R / f, C] from integers [R, C] in [0, 2**bits): row r*f + j at bits j*bits."""
    f = 32 // bits
    v = values.to(torch.int64).reshape(-1, f, values.shape[1])
    shifts = (torch.arange(f, dtype=torch.int64, device=v.device) * bits).view(1, f, 1)
    packed = (v << shifts).sum(1)  # disjoint bit fields: sum == bitwise or
    return _to_int32(packed)


def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    f = 32 // bits
    shifts = (torch.arange(f, dtype=torch.int32, device=packed.device) * bits).view(1, f, 1)
    v = (packed.to(torch.int32).unsqueeze(1) >> shifts) & (2 ** bits - 1)
    return v.reshape(-1, packed.shape[1])


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(x >= 2 ** 31, x - 2 ** 32, x).to(torch.int32)


def pack_gptq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Tensors (without the layer prefix) of ``qw`` in GPTQ v1 packing."""
    N, K = qw.codes.shape
    f = 32 // qw.bits
    if K % f or N % f:
        raise QuantFormatError(f"GPTQ packing needs in/out features divisible by {f}, "
                               f"got [{N}, {K}]")
    zeros_minus_one = (qw.zeros.to(torch.int64) - 1) & (2 ** qw.bits - 1)
    g_idx = qw.group_index().to(torch.int32)
    return {
        "qweight": _pack_rows(qw.codes.t(), qw.bits),
        "qzeros": _pack_cols(zeros_minus_one.t(), qw.bits),
        "scales": qw.scales.t().contiguous().half(),
        "g_idx": g_idx,
    }


def _pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C / f] packing consecutive columns of [R, C] low bits first."""
    return _pack_rows(values.t(), bits).t().contiguous()


def _unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return _unpack_rows(packed.t(), bits).t()


def unpack_gptq(t: dict[str, torch.Tensor], bits: int, name: str) -> QuantizedWeight:
    """The canonical weight from GPTQ v1 tensors ``qweight``, ``qzeros``, ``scales``, ``g_idx``."""
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    codes = _unpack_rows(qweight, bits).t()  # [N, K]
    N, K = codes.shape
    if scales.shape[1] != N:
        raise QuantFormatError(f"{name}: scales {tuple(scales.shape)} do not match qweight "
                               f"{tuple(qweight.shape)} ({bits}-bit GPTQ)")
    G = scales.shape[0]
    zeros = (_unpack_cols(qzeros, bits)[:, :N] + 1) & (2 ** bits - 1)  # [G, N]
    g_idx = t.get("g_idx")
    group_size = K // G
    if g_idx is not None:
        g_idx = g_idx.to(torch.int32)
        if torch.equal(g_idx, torch.arange(K, dtype=torch.int32, device=g_idx.device)
                       // group_size):
            g_idx = None  # plain contiguous groups: no need to carry the index
    return QuantizedWeight(codes=codes.to(torch.uint8).contiguous(),
                           scales=scales.float().t().contiguous(),
                           zeros=zeros.t().to(torch.uint8).contiguous(),
                           bits=bits, group_size=group_size, g_idx=g_idx)


def pack_awq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """Tensors of a 4-bit ``qw`` in AutoAWQ's "gemm" packing."""
    N, K = qw.codes.shape
    if qw.bits != 4 or N % 8:
        raise QuantFormatError(f"AWQ packing is 4-bit with out features divisible by 8, got "
                               f"{qw.bits}-bit [{N}, {K}]")
    if qw.g_idx is not None:
        raise QuantFormatError("AWQ packing has no act-order (g_idx); export as GPTQ instead")
    order = torch.tensor(AWQ_ORDER, device=qw.codes.device)

    def pack(v: torch.Tensor) -> torch.Tensor:  # [R, N] -> [R, N / 8]
        v = v.to(torch.int64).reshape(v.shape[0], N // 8, 8)[:, :, order]
        return _pack_cols(v.reshape(v.shape[0], N), 4)

    return {"qweight": pack(qw.codes.t()), "qzeros": pack(qw.zeros.t()),
            "scales": qw.scales.t().contiguous().half()}


def unpack_awq(t: dict[str, torch.Tensor], name: str) -> QuantizedWeight:
    """The canonical weight from AutoAWQ "gemm" tensors."""
    inverse = torch.argsort(torch.tensor(AWQ_ORDER, device=t["qweight"].device))

    def unpack(p: torch.Tensor) -> torch.Tensor:  # [R, N / 8] -> [R, N]
        v = _unpack_cols(p, 4).reshape(p.shape[0], -1, 8)[:, :, inverse]
        return v.reshape(p.shape[0], -1)

    codes, zeros, scales = unpack(t["qweight"]).t(), unpack(t["qzeros"]), t["scales"]
    N, K = codes.shape
    if scales.shape[1] != N or zeros.shape != scales.shape:
        raise QuantFormatError(f"{name}: AWQ scales {tuple(scales.shape)} / qzeros do not "
                               f"match qweight {tuple(t['qweight'].shape)}")
    return QuantizedWeight(codes=codes.to(torch.uint8).contiguous(),
                           scales=scales.float().t().contiguous(),
                           zeros=zeros.t().to(torch.uint8).contiguous(),
                           bits=4, group_size=K // scales.shape[0])


def pack_int8_channel(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """compressed-tensors int-quantized: signed int8 weight and a per-channel scale."""
    if qw.bits != 8 or qw.scales.shape[1] != 1 or not bool((qw.zeros == 128).all()):
        raise QuantFormatError("int-quantized needs symmetric per-channel 8-bit weights")
    return {"weight": (qw.codes.to(torch.int16) - 128).to(torch.int8),
            "weight_scale": qw.scales.half()}


def unpack_int8_channel(t: dict[str, torch.Tensor], act_bits: int, name: str
                        ) -> QuantizedWeight:
    w, scale = t["weight"], t["weight_scale"]
    if w.dtype != torch.int8 or scale.shape != (w.shape[0], 1):
        raise QuantFormatError(f"{name}: expected int8 weight [N, K] and weight_scale [N, 1], "
                               f"got {w.dtype} {tuple(w.shape)} and {tuple(scale.shape)}")
    codes = (w.to(torch.int16) + 128).to(torch.uint8)
    return QuantizedWeight(codes=codes, scales=scale.float(),
                           zeros=torch.full_like(codes[:, :1], 128), bits=8,
                           group_size=w.shape[1], act_bits=act_bits)


def quantization_config(fmt: str, bits: int, group_size: int, sym: bool, act_bits: int,
                        method: str, desc_act: bool = False) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json for a twinfer-made checkpoint."""
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                "desc_act": desc_act, "sym": sym, "checkpoint_format": "gptq",
                "true_sequential": True, "damp_percent": 0.01, "quantizer": f"twinfer-{method}",
                "modules_to_not_convert": ["lm_head"]}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": bits, "group_size": group_size,
                "zero_point": not sym, "version": "gemm", "quantizer": f"twinfer-{method}",
                "modules_to_not_convert": ["lm_head"]}
    if fmt == "compressed-tensors":
        acts = ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                 "dynamic": True} if act_bits == 8 else None)
        return {"quant_method": "compressed-tensors", "format": "int-quantized",
                "quantization_status": "compressed", "ignore": ["lm_head"],
                "config_groups": {"group_0": {
                    "targets": ["Linear"], "input_activations": acts,
                    "weights": {"num_bits": 8, "type": "int", "symmetric": True,
                                "strategy": "channel", "dynamic": False}}},
                "quantizer": f"twinfer-{method}"}
    raise QuantFormatError(f"unknown export format {fmt!r} (choose {', '.join(FORMATS)})")


def read_quantized_linear(tensors: dict[str, torch.Tensor], prefix: str,
                          qconfig: dict[str, Any] | None) -> QuantizedWeight | None:
    """The canonical weight of linear ``prefix`` under ``qconfig``, or None if it is dense."""
    if not qconfig:
        return None
    method = qconfig.get("quant_method")
    if method in ("gptq", "awq"):
        if prefix + ".qweight" not in tensors:
            return None
        t = {k: tensors[f"{prefix}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")
             if f"{prefix}.{k}" in tensors}
        for k in ("qzeros", "scales"):
            if k not in t:
                raise QuantFormatError(f"{prefix}: {method} checkpoint lacks {prefix}.{k}")
        bits = int(qconfig.get("bits", 4))
        if method == "awq":
            if bits != 4 or qconfig.get("version", "gemm").lower() != "gemm":
                raise QuantFormatError(f"{prefix}: only 4-bit AWQ 'gemm' checkpoints are "
                                       f"supported, got {bits}-bit {qconfig.get('version')!r}")
            return unpack_awq(t, prefix)
        if qconfig.get("checkpoint_format", "gptq") not in ("gptq",):
            raise QuantFormatError(f"{prefix}: GPTQ checkpoint_format "
                                   f"{qconfig.get('checkpoint_format')!r} is not supported")
        if bits not in (4, 8):
            raise QuantFormatError(f"{prefix}: {bits}-bit GPTQ is not supported (4 or 8)")
        return unpack_gptq(t, bits, prefix)
    if method == "compressed-tensors":
        if prefix + ".weight_scale" not in tensors:
            return None
        groups = qconfig.get("config_groups") or {}
        acts = next(iter(groups.values()), {}).get("input_activations") if groups else None
        act_bits = 8 if acts and acts.get("num_bits") == 8 else 16
        return unpack_int8_channel({"weight": tensors[prefix + ".weight"],
                                    "weight_scale": tensors[prefix + ".weight_scale"]},
                                   act_bits, prefix)
    raise QuantFormatError(f"unsupported quant_method {method!r} (twinfer reads gptq, awq, "
                           "compressed-tensors)")
