"""``twinfer report MODEL --variants ... --engines ... -o DIR``: what each quantization costs
in accuracy and buys in size and speed, one Markdown report with plots.

Per variant: perplexity, KL divergence and same-top-token rate against the unquantized base
(``twinfer.evaluate.kl_divergence``, whose perplexity is ``perplexity()``'s on the same windows),
task accuracy with ``--tasks``, all with the first engine that runs here; per engine: decode
tok/s, prefill time and memory at each batch size (``bench.offline.measure``).

Reruns compute only what is new: quantized checkpoints are cached in ``DIR/checkpoints`` and
results in ``DIR/results`` (``bench.quant_report_steps``); report.md, report.json and the plots
(``bench.quant_report_plots``) are rebuilt from them every time.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from tqdm.auto import tqdm

from bench.quant_report_plots import build_markdown, plot_all, recommend
from bench.quant_report_steps import QUANTIZE_LOG, ReportSteps, Variant

# Chosen so that fp16,w8a16,w4a16-rtn,w4a16-awq of SmolLM2-135M finish in under 20 minutes on a
# shared 2-core CPU; on a GPU raise them (e.g. --calib-samples 128 --max-windows 40
# --batch-sizes 1,8,64,256 --output-len 128).
_DEFAULTS = dict(group_size=64, calib="default", calib_samples=32, calib_seqlen=256,
                 data="wikitext2", ctx=512, max_windows=6, batch_sizes="1,8", input_len=32,
                 output_len=16, iters=200)


VARIANTS = {v.name: v for v in (
    Variant("fp16", None),
    Variant("w8a16", "rtn", 8, per_channel=True, sym=True),
    Variant("w8a8", "smoothquant", 8, 8, per_channel=True, sym=True),
    Variant("w4a16-rtn", "rtn", 4), Variant("w4a16-awq", "awq", 4),
    Variant("w4a16-gptq", "gptq", 4), Variant("w4a16-autoround", "autoround", 4))}
ENGINES = ("torch", "fast")


def parse_variants(text: str) -> list[Variant]:
    """Variants named in a comma list, fp16 first (always: it is the reference)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown variant(s) {', '.join(map(repr, unknown)) or '(none given)'}"
                         f"; valid: {', '.join(VARIANTS)}")
    return [VARIANTS["fp16"]] + [VARIANTS[n] for n in dict.fromkeys(names) if n != "fp16"]


def parse_engines(text: str) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in ENGINES]
    if bad or not names:
        raise ValueError(f"unknown engine(s) {', '.join(map(repr, bad)) or '(none given)'}; "
                         f"valid: {', '.join(ENGINES)}")
    return names


def register(sub) -> None:
    """Add the ``report`` subcommand to twinfer's argument parser."""
    d = _DEFAULTS
    p = sub.add_parser("report", help="quantization report: accuracy, size and speed of "
                       "several variants of a model, Markdown + JSON + plots")
    p.add_argument("model", help="built-in name (smollm2-135m), HF directory or .gguf file")
    p.add_argument("--variants", default="fp16,w8a16,w4a16-rtn,w4a16-awq",
                   help=f"comma list of: {', '.join(VARIANTS)} (fp16 is always included)")
    p.add_argument("--engines", default="torch,fast", help="comma list of torch, fast "
                   "(fast is skipped off CUDA); accuracy uses the first that runs")
    p.add_argument("-o", "--output-dir", required=True, help="report and cache directory")
    p.add_argument("--group-size", type=int, default=d["group_size"],
                   help="4-bit variants: input channels per scale (must divide the model's "
                   "linear input sizes; 128 does not divide SmolLM2's 576)")
    p.add_argument("--calib", default=d["calib"], help="calibration source, as twinfer quantize")
    p.add_argument("--calib-samples", type=int, default=d["calib_samples"])
    p.add_argument("--calib-seqlen", type=int, default=d["calib_seqlen"])
    p.add_argument("--iters", type=int, default=d["iters"], help="AutoRound steps per block")
    p.add_argument("--data", default=d["data"], help="perplexity text: wikitext2, .txt, .jsonl")
    p.add_argument("--ctx", type=int, default=d["ctx"], help="tokens per perplexity window")
    p.add_argument("--max-windows", type=int, default=d["max_windows"])
    p.add_argument("--tasks", nargs="+", default=[], metavar="FILE", help="task files, as "
                   "twinfer eval tasks")
    p.add_argument("--tasks-limit", type=int, default=None, help="first N items of each task")
    p.add_argument("--batch-sizes", default=d["batch_sizes"])
    p.add_argument("--input-len", type=int, default=d["input_len"], help="speed prompts' tokens")
    p.add_argument("--output-len", type=int, default=d["output_len"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="compute dtype of every variant (auto: float32 on CPU, float16 on CUDA)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    report = make_report(args)
    print(report["markdown"])
    return 0


def make_report(args: argparse.Namespace) -> dict:
    """Compute (or read back) every number, write report.json / report.md / plots."""
    import platform

    import torch

    from bench.report import environment
    from twinfer.config import parse_dtype, resolve_device

    variants, engines = parse_variants(args.variants), parse_engines(args.engines)
    device = resolve_device(args.device)
    dtype = str(parse_dtype(args.dtype, device)).removeprefix("torch.")
    runner = ReportSteps(args, device, dtype)
    notes = []
    if "fast" in engines and not device.startswith("cuda"):
        engines.remove("fast")
        notes.append("engine fast skipped: off CUDA it runs only in Triton's interpreter "
                     "(TRITON_INTERPRET=1), far too slow to time")
    if not engines:
        raise ValueError("no engine in --engines runs here (fast needs CUDA); add torch")
    if runner.model_path.suffix == ".gguf":
        notes.append(f"the base model is the GGUF file {runner.model_path.name}, dequantized on "
                     "load: 'fp16' is its dequantized weights, and every variant is quantized "
                     "from them")
    load, start = os.getloadavg()[0], time.perf_counter()  # other jobs skew CPU timings
    env = {**environment(), "device": device, "torch": torch.__version__,
           "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda")
           else platform.processor() or platform.machine(),
           "threads": torch.get_num_threads()}
    results = _run_steps(runner, variants, engines, not args.no_progress)
    env["load_average_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]  # start, end
    env["wall_s"] = round(time.perf_counter() - start, 1)  # this run's, caches included
    report = {"kind": "quant_report", "model": args.model, "model_path": str(runner.model_path),
              "settings": {k: getattr(args, k) for k in (*_DEFAULTS, "seed", "tasks",
                                                          "tasks_limit")},
              "engines": engines, "accuracy_engine": engines[0], "dtype": dtype,
              "environment": env, "notes": notes, "variants": results}
    report["recommendation"] = recommend(report)
    runner.out.mkdir(parents=True, exist_ok=True)
    report["plots"] = [p.name for p in plot_all(report, runner.out)]
    report["markdown"] = build_markdown(report)
    (runner.out / "report.md").write_text(report["markdown"])
    (runner.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _run_steps(runner: ReportSteps, variants: list[Variant], engines: list[str],
               progress: bool) -> dict:
    """Every variant x stage step under one progress bar; the per-variant results."""
    steps = [(v, stage, e) for v in variants
             for stage, e in ([("quantize", engines[0])] if v.method else [])
             + [("accuracy", engines[0])] + [("speed", e) for e in engines]]
    results = {v.name: {"speed": {}} for v in variants}
    runner.check_group_size(variants, engines[0])
    slot: dict = {}  # the variant model accuracy loaded, for its speed run on the same engine
    bar = tqdm(steps, desc="report", unit="step", disable=not progress)
    for v, stage, engine in bar:
        label = f"{v.name} {stage}" + (f" ({engine})" if stage == "speed" else "")
        bar.set_description(label)
        if stage == "quantize":
            slot = {}
            status = runner.quantize(v, engine)
        elif stage == "accuracy":
            slot = {"engine": engine}
            status, results[v.name]["accuracy"] = runner.accuracy(v, engine, slot)
        else:
            status, results[v.name]["speed"][engine] = runner.speed(v, engine, slot)
        tqdm.write(f"[{status}] {label}")
    bar.close()
    for v in variants:
        r, ckpt = results[v.name], runner.checkpoint_dir(v) if v.method else None
        r.update(method=v.method, weight_bits=v.bits, act_bits=v.act_bits, sym=v.sym,
                 group_size=None if v.method is None or v.per_channel else runner.args.group_size,
                 checkpoint=str(ckpt) if ckpt else None)
        if ckpt:
            r["checkpoint_bytes"] = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
            log = ckpt / QUANTIZE_LOG
            r["quantize_s"] = json.loads(log.read_text())["seconds"] if log.is_file() else None
        else:
            r["checkpoint_bytes"], r["quantize_s"] = r["accuracy"]["checkpoint_bytes"], None
    return results
