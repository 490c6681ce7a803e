"""Write a ``QuantizedModel`` as a standard checkpoint: config.json with
``quantization_config``, model.safetensors, and the tokenizer, so that ``twinfer generate
OUT_DIR`` (and other tools that read GPTQ / AWQ / compressed-tensors) need nothing else.

Format by scheme: W8A8 -> compressed-tensors int-quantized; GPTQ's output and every
symmetric or 8-bit weight-only scheme -> GPTQ; other 4-bit asymmetric (RTN, AWQ) -> AWQ
"gemm". Tensors other than the quantized linears (embeddings, norms, lm_head) are fp16.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantize.pipeline import QuantizedModel
from twinfer.quant_formats import (
    pack_awq,
    pack_gptq,
    pack_int8_channel,
    quantization_config,
)

MODEL_TYPES = {  # config.json "model_type" per architecture
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


@dataclass
class ExportSummary:
    out_dir: Path
    format: str
    bytes_before: int  # the source's tensors at 16 bits per parameter
    bytes_after: int  # model.safetensors
    linear_bytes_before: int
    linear_bytes_after: int


def choose_format(qm: QuantizedModel) -> str:
    scheme = qm.options.scheme
    if scheme.act_bits == 8:
        return "compressed-tensors"
    if scheme.bits == 4 and not scheme.sym and qm.options.method != "gptq":
        return "awq"
    return "gptq"


def save_quantized(qm: QuantizedModel, out_dir: str | Path, tokenizer=None,
                   fmt: str | None = None) -> ExportSummary:
    """Write ``qm`` to ``out_dir`` (created) and return sizes before/after."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fmt = fmt or choose_format(qm)
    pack = {"gptq": pack_gptq, "awq": pack_awq, "compressed-tensors": pack_int8_channel}[fmt]
    tensors: dict[str, torch.Tensor] = {}
    linear_before = linear_after = 0
    for prefix, qw in qm.linears.items():
        for k, v in pack(qw).items():
            tensors[f"{prefix}.{k}"] = v.contiguous()
            linear_after += v.numel() * v.element_size()
        linear_before += qw.codes.numel() * 2
    for name, t in qm.dense.items():
        tensors[name] = t.to(torch.float16).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    cfg = dict(qm.source.hf_config)
    cfg.setdefault("model_type", MODEL_TYPES[qm.source.config.architecture])
    cfg["torch_dtype"] = "float16"
    s, o = qm.options.scheme, qm.options
    group = -1 if s.group_size == -1 else s.group_size
    cfg["quantization_config"] = quantization_config(fmt, s.bits, group, s.sym, s.act_bits,
                                                     o.method, o.act_order)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.hf.save_pretrained(str(out))
    before = sum(t.numel() * 2 for t in qm.source.tensors.values())
    return ExportSummary(out, fmt, before, (out / "model.safetensors").stat().st_size,
                         linear_before, linear_after)
