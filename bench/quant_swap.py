"""Where does one quantized checkpoint lose accuracy against another? A dense float32 copy of
BASE with some units of some layers taken from OTHER (both quantized from the same model), to
evaluate with ``twinfer eval ppl``:

    python -m bench.quant_swap BASE OTHER OUT --units attn_in [--layers 10-19]
    twinfer eval ppl OUT --data wikitext2 --ctx 2048 --dtype float32 --engine torch

Units are what a method changes together: ``attn_in`` = the input norm with q/k/v (AWQ and
GPTQ's AWQ scales fold into the norm), ``o`` = o_proj, ``mlp`` = the post-attention norm with
gate/up/down (down's scales fold into up's rows). ``q``, ``k``, ``v`` and ``gate`` alone keep
BASE's norm: OTHER's weight is then written times norm_other / norm_base per input column, the
same function of the layer's input. Quantized linears are written dequantized, so OUT with
no units swapped scores exactly as BASE does (weight-only schemes; a W8A8 checkpoint's
activation rounding is not kept). bench/RESULTS.md has AWQ against GPTQ.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from twinfer.weights import ModelWeights, load_weights

UNITS = {
    "attn_in": ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "mlp": ("post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "q": ("self_attn.q_proj",), "k": ("self_attn.k_proj",), "v": ("self_attn.v_proj",),
    "gate": ("mlp.gate_proj",),
}
_NORM_OF = {"self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
            "self_attn.v_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm"}
_QUANTIZED_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx", ".weight_scale")


def swapped_tensors(base: ModelWeights, other: ModelWeights, units: list[str],
                    layers: range) -> dict[str, torch.Tensor]:
    """BASE's tensors in float32 (linears dequantized), with ``units`` of ``layers`` from
    OTHER."""
    unknown = set(units) - set(UNITS)
    if unknown:
        raise ValueError(f"unknown units {sorted(unknown)}; choose from {sorted(UNITS)}")
    from_other = {f"model.layers.{i}.{m}" for i in layers for u in units for m in UNITS[u]}
    names = set()
    for name in base.tensors:
        for suffix in _QUANTIZED_SUFFIXES:
            if name.endswith(suffix):
                name = name.removesuffix(suffix) + ".weight"
        names.add(name)
    out = {}
    for name in sorted(names):
        module = name.rsplit(".", 1)[0]
        weights = other if module in from_other else base
        quantized = weights.quantized_linear(module) if name.endswith(".weight") else None
        tensor = quantized.dequantize(torch.float32) if quantized is not None else \
            weights.get(name).float()
        if weights is other and name.endswith(".weight"):
            tensor = _under_base_norm(tensor, module, base, other, from_other)
        out[name] = tensor.contiguous()
    return out


def _under_base_norm(tensor: torch.Tensor, module: str, base: ModelWeights,
                     other: ModelWeights, from_other: set[str]) -> torch.Tensor:
    """OTHER's weight of linear ``module``, for a layer that keeps BASE's input norm: times
    norm_other / norm_base per input column (both norms hold folded scales)."""
    parts = module.split(".")
    layer, linear = ".".join(parts[:3]), ".".join(parts[3:])
    norm = f"{layer}.{_NORM_OF[linear]}" if linear in _NORM_OF else None
    if norm is None or norm in from_other:
        return tensor
    return tensor * (other.get(norm + ".weight").float() / base.get(norm + ".weight").float())


def write_swapped(base_dir: str | Path, other_dir: str | Path, out_dir: str | Path,
                  units: list[str], layers: range | None = None) -> Path:
    """``swapped_tensors`` saved as a dense checkpoint (config and tokenizer files from the
    BASE directory)."""
    base, other = load_weights(base_dir), load_weights(other_dir)
    if other.config != base.config:
        raise ValueError(f"{other_dir} and {base_dir} are not the same model")
    layers = range(base.config.num_layers) if layers is None else layers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(swapped_tensors(base, other, units, layers), str(out / "model.safetensors"))
    cfg = {k: v for k, v in base.hf_config.items() if k != "quantization_config"}
    (out / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float32"}, indent=1))
    for f in Path(base_dir).iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, out / f.name)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base")
    ap.add_argument("other")
    ap.add_argument("out")
    ap.add_argument("--units", default="", help=f"comma-separated, of {', '.join(UNITS)}")
    ap.add_argument("--layers", help="FIRST-LAST (inclusive); default all")
    args = ap.parse_args(argv)
    layers = None
    if args.layers:
        first, last = map(int, args.layers.split("-"))
        layers = range(first, last + 1)
    units = [u for u in args.units.split(",") if u]
    out = write_swapped(args.base, args.other, args.out, units, layers)
    print(f"{out}: {args.base} with {', '.join(units) or 'nothing'} of layers "
          f"{args.layers or 'all'} from {args.other}, dense float32")


if __name__ == "__main__":
    main()
