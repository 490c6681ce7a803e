"""AutoRound (Cheng et al., 2023) through Intel's ``auto-round`` package: signed-gradient
tuning of rounding offsets and weight ranges, block by block. The package works on a
transformers model, so the source weights are written out as a plain Hugging Face directory
first (GGUF sources included), and its GPTQ-format export is what twinfer then serves.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantize.calibration import load_calibration_texts
from quantize.export import MODEL_TYPES, ExportSummary
from quantize.pipeline import QuantizeOptions
from twinfer.weights import ModelWeights, load_weights


def write_hf_dir(weights: ModelWeights, tokenizer, out: Path) -> Path:
    """The full-precision model as a transformers-loadable directory."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(weights.hf_config)
    cfg.setdefault("model_type", MODEL_TYPES[weights.config.architecture])
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer.hf.save_pretrained(str(out))
    return out


def autoround_quantize(weights: ModelWeights, tokenizer, options: QuantizeOptions,
                       out_dir: str | Path, iters: int = 200, progress: bool = True
                       ) -> ExportSummary:
    """Quantize with auto-round and save in GPTQ format to ``out_dir``."""
    try:
        from auto_round import AutoRound
    except ImportError as e:
        raise RuntimeError("--method autoround needs the 'quant' extra: "
                           "pip install 'twinfer[quant]'") from e
    from transformers import AutoModelForCausalLM

    s = options.scheme
    if s.act_bits != 16:
        raise ValueError("autoround produces weight-only checkpoints (--abits 16)")
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_hf_dir(weights, tokenizer, Path(tmp) / "hf")
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
        texts = load_calibration_texts(options.calib)
        group = s.group_size if s.group_size != -1 else -1
        ar = AutoRound(model, tokenizer.hf, bits=s.bits, group_size=group, sym=s.sym,
                       dataset=texts, iters=iters, seqlen=options.calib_seqlen,
                       nsamples=options.calib_samples, seed=options.seed,
                       device_map=options.device, batch_size=min(8, options.calib_samples))
        export_dir = Path(tmp) / "export"
        ar.quantize_and_save(str(export_dir), format="auto_gptq")
        # auto-round writes into a subfolder named after the scheme (e.g. hf-w4g32/).
        config = next(export_dir.rglob("config.json"), None)
        if config is None:
            raise RuntimeError(f"auto-round wrote no config.json under {export_dir}")
        out.mkdir(parents=True, exist_ok=True)
        for f in config.parent.iterdir():
            shutil.move(str(f), str(out / f.name))
    saved = load_weights(out)  # fail here, not at serving time, if the export is unreadable
    before = sum(t.numel() * 2 for t in weights.tensors.values())
    linear_after = sum(t.numel() * t.element_size() for n, t in saved.tensors.items()
                       if n.endswith(("qweight", "qzeros", "scales", "g_idx")))
    linear_before = sum(t.numel() * 2 for n, t in weights.tensors.items()
                        if n.startswith("model.layers.") and n.endswith("_proj.weight"))
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return ExportSummary(out, "gptq", before, size, linear_before, linear_after)
