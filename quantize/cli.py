"""``twinfer quantize MODEL --method ... -o OUT_DIR``: the command line of quantize/."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from quantize.export import ExportSummary, save_quantized
from quantize.pipeline import QuantizeOptions, quantize_model
from twinfer.quant import QuantScheme


def register(sub) -> None:
    """Add the ``quantize`` subcommand to twinfer's argument parser."""
    p = sub.add_parser("quantize", help="quantize a model into an INT8 / 4-bit checkpoint")
    p.add_argument("model", help="built-in name (smollm2-135m), HF directory or .gguf file")
    p.add_argument("--method", required=True,
                   choices=["rtn", "awq", "gptq", "smoothquant", "autoround"])
    p.add_argument("--wbits", type=int, default=4, choices=[4, 8])
    p.add_argument("--abits", type=int, default=16, choices=[8, 16],
                   help="8: dynamic per-token int8 activations (smoothquant, W8A8)")
    p.add_argument("--group-size", type=int, default=None,
                   help="input channels per scale; -1 per output channel (default: 128 for "
                        "4-bit, -1 for 8-bit)")
    p.add_argument("--sym", action="store_true", help="symmetric (no zero points)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: desc_act column order (default: on; 1.138 -> 1.113 P on SmolLM2 "
                        "w4a16 g64; --no-act-order for tools that cannot load g_idx)")
    p.add_argument("--damp", type=float, default=0.01,
                   help="GPTQ: dampening added to the Hessian diagonal, a fraction of its mean")
    p.add_argument("--mse", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: search each group's range (shrink grid, error norm 2.4) "
                        "instead of taking its min / max (default: on)")
    p.add_argument("--awq-scales", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: first search and fold AWQ's activation-aware input scales "
                        "(default: on)")
    p.add_argument("--awq-block-loss", action=argparse.BooleanOptionalAction, default=False,
                   help="AWQ (and GPTQ's AWQ scales): judge the q/k/v and gate/up scales by "
                        "the whole attention / MLP block's output error, as AutoAWQ does "
                        "(default: off)")
    p.add_argument("--awq-o-scales", action=argparse.BooleanOptionalAction, default=False,
                   help="AWQ (and GPTQ's AWQ scales): under grouped-query attention also "
                        "search o_proj's input scales, one per v_proj row, folded into v_proj "
                        "(default: off)")
    p.add_argument("--awq-clip-sweeps", type=int, default=2,
                   help="AWQ: after the clip search, passes re-choosing each group's clip "
                        "for its output channel's whole error, the other groups fixed "
                        "(default: 2)")
    p.add_argument("--awq-clip-both-ends", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="AWQ: clip candidates also shrink a group's min and max by different "
                        "factors (default: on)")
    p.add_argument("--awq-scale-after-clip", action=argparse.BooleanOptionalAction,
                   default=False,
                   help="AWQ: judge each scale candidate by its output error after a clip "
                        "search rather than after plain rounding")
    p.add_argument("--awq-clip-qk", action=argparse.BooleanOptionalAction, default=True,
                   help="AWQ: search q_proj's and k_proj's clipping too (default: on; AutoAWQ "
                        "leaves them alone, their errors passing through the softmax)")
    p.add_argument("--awq-duo", action=argparse.BooleanOptionalAction, default=False,
                   help="AWQ (and GPTQ's AWQ scales): also try AutoAWQ's weight-aware scale "
                        "candidates mean|x|^a / mean|w|^(1-a) (default: off; measured worse)")
    p.add_argument("--true-sequential", action="store_true",
                   help="GPTQ: quantize q/k/v, o, gate/up, down in turn, each on inputs "
                        "through the already quantized ones")
    p.add_argument("--float-inputs", action="store_true",
                   help="calibrate each layer on the unquantized model's hidden states "
                        "(AutoAWQ) rather than through the quantized earlier layers")
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    p.add_argument("--calib", default="default",
                   help="'default' (Python's bundled docs), a .txt/.jsonl/.parquet file, or a "
                        "datasets hub name")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=200, help="AutoRound: tuning steps per block")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--format", default=None, choices=["gptq", "awq", "compressed-tensors"],
                   help="checkpoint format (default: by scheme)")
    p.add_argument("-o", "--output", required=True, help="output directory")


def options_from_args(args: argparse.Namespace) -> QuantizeOptions:
    from twinfer.config import resolve_device

    group = args.group_size if args.group_size is not None else (128 if args.wbits == 4 else -1)
    sym = args.sym or args.abits == 8  # W8A8 is symmetric by construction
    scheme = QuantScheme(bits=args.wbits, group_size=group, sym=sym, act_bits=args.abits)
    return QuantizeOptions(method=args.method, scheme=scheme, calib=args.calib,
                           calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                           seed=args.seed, device=resolve_device(args.device),
                           act_order=args.act_order, damp=args.damp, mse=args.mse,
                           awq_scales=args.awq_scales,
                           awq_block_loss=args.awq_block_loss,
                           awq_o_scales=args.awq_o_scales,
                           awq_clip_sweeps=args.awq_clip_sweeps,
                           awq_clip_both_ends=args.awq_clip_both_ends,
                           awq_clip_qk=args.awq_clip_qk,
                           awq_scale_after_clip=args.awq_scale_after_clip,
                           awq_duo=args.awq_duo,
                           true_sequential=args.true_sequential,
                           float_inputs=args.float_inputs,
                           alpha=args.alpha)


def quantize_checkpoint(model: str, out_dir: str | Path, options: QuantizeOptions,
                        fmt: str | None = None, iters: int = 200,
                        progress: bool = True) -> ExportSummary:
    """Resolve, load, quantize and save ``model``; the API behind ``twinfer quantize``."""
    from twinfer.models import resolve_model, twinfer_home
    from twinfer.tokenizer import Tokenizer
    from twinfer.weights import load_weights

    path = resolve_model(model)
    weights = load_weights(path)
    if weights.quantization_config:
        raise ValueError(f"{path} is already quantized "
                         f"({weights.quantization_config.get('quant_method')}); start from "
                         "the full-precision model")
    tokenizer = Tokenizer.load(path, weights.config.eos_token_ids,
                               cache_dir=twinfer_home())
    if options.method == "autoround":
        from quantize.autoround import autoround_quantize
        return autoround_quantize(weights, tokenizer, options, out_dir, iters, progress)
    qm = quantize_model(weights, tokenizer, options, progress=progress)
    return save_quantized(qm, out_dir, tokenizer, fmt)


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    start = time.perf_counter()
    summary = quantize_checkpoint(args.model, args.output, options, args.format, args.iters)
    elapsed = time.perf_counter() - start
    mb = 1e6
    print(f"\n{options.method} {options.scheme.name} -> {summary.out_dir} "
          f"({summary.format} format)")
    print(f"  linears: {summary.linear_bytes_before / mb:,.1f} MB at 16 bits -> "
          f"{summary.linear_bytes_after / mb:,.1f} MB "
          f"({summary.linear_bytes_before / max(summary.linear_bytes_after, 1):.2f}x smaller)")
    print(f"  checkpoint: {summary.bytes_before / mb:,.1f} MB at 16 bits -> "
          f"{summary.bytes_after / mb:,.1f} MB")
    print(f"  time: {elapsed:.1f} s")
    print(f"  try: twinfer generate {summary.out_dir} --prompt 'Hello'")
    return 0
