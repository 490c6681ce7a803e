"""Quantize a dense checkpoint while loading it (``--quantization w4a16``), with RTN.

The result is packed exactly as a saved checkpoint would be (GPTQ for weight-only,
compressed-tensors for W8A8), so the engines take the one code path they take for files on
disk. RTN needs no calibration data and takes seconds; calibrated methods (AWQ, GPTQ,
SmoothQuant) belong to ``twinfer quantize``, which writes a checkpoint once.
"""

from __future__ import annotations

import dataclasses

from twinfer.quant import QuantScheme, quantize_rtn
from twinfer.quant_formats import pack_gptq, pack_int8_channel, quantization_config
from twinfer.weights import ModelWeights

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_weights_rtn(weights: ModelWeights, scheme: QuantScheme) -> ModelWeights:
    """Every decoder linear of ``weights`` RTN-quantized and packed; the rest unchanged.

    Dense tensors are dropped as they are quantized, so peak memory stays near the dense
    model plus one packed linear.
    """
    if weights.quantization_config:
        raise ValueError(f"{weights.source} is already quantized "
                         f"({weights.quantization_config.get('quant_method')}); "
                         "--quantization applies to dense checkpoints only")
    linears = [n for n in weights.tensors if _is_linear_weight(n)]
    for name in linears:  # fail before anything is consumed
        scheme.group_size_for(weights.tensors[name].shape[1], name.removesuffix(".weight"))
    fmt = "compressed-tensors" if scheme.act_bits == 8 else "gptq"
    pack = pack_int8_channel if scheme.act_bits == 8 else pack_gptq
    tensors = {}
    for name in list(weights.tensors):
        prefix = name.removesuffix(".weight")
        if _is_linear_weight(name):
            dense = weights.tensors.pop(name)
            for key, t in pack(quantize_rtn(dense, scheme, prefix)).items():
                tensors[f"{prefix}.{key}"] = t
        else:
            tensors[name] = weights.tensors.pop(name)
    qcfg = quantization_config(fmt, scheme.bits, scheme.group_size, scheme.sym,
                               scheme.act_bits, "rtn")
    hf_config = {**weights.hf_config, "quantization_config": qcfg}
    return dataclasses.replace(weights, tensors=tensors, hf_config=hf_config)


def _is_linear_weight(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in _LINEARS
