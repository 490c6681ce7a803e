"""Quantized engine_fast at Llama-3.1-8B shapes (random weights) against fp16, in one run.

    python -m bench.quant_roofline [--layers 32] [--variants fp16,w8a16,w4a16,w8a8]
                                   [--dtype float16|bfloat16]

For each variant: the whole model quantized with RTN on the GPU (timed: the issue's "RTN
under a minute"), then decode steps at batch 1 / 16 / 64 / 256 (context 1,024) and a 2,048-token
prefill through FastRunner, each with its byte roofline (weights as stored plus KV, over the
copy bandwidth measured in the same run) and its speed-up over fp16. Then AWQ and GPTQ are
timed on ``--calib-layers`` layers with 128 x 512 random-token windows and extrapolated to
the model's layer count (each layer costs the same).

Counts: fp16 linears 13.96 GB + lm_head 1.05 GB. w4a16 g128 linears 13.96 / 4 x (1 + 4 / 128 x 2)
= 3.71 GB (kernels keep fp16 scales and zeros), so batch-1 decode can gain 15.0 / 4.76 = 3.15x;
w8a16 7.0 + 1.05 -> 1.86x. ``--dtype bfloat16`` runs every variant with bf16 activations
(the "fp16" row is then the dense bf16 model): the half2 GEMV is fp16-only, so bf16 weight-only
decode takes the float32-math GEMV.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import time

import torch
import triton

from bench.fast_roofline import copy_bandwidth, decode_batch, llama31_8b_config, prefill_batch
from quantize.pipeline import QuantizeOptions, quantize_model
from twinfer.config import CacheConfig, EngineConfig, SchedulerConfig
from twinfer.dummy import dummy_weights
from twinfer.online_quant import quantize_weights_rtn
from twinfer.quant import QuantScheme
from twinfer.weights import ModelWeights

SCHEMES = {
    "w8a16": QuantScheme(8, -1, True),
    "w4a16": QuantScheme(4, 128, True),
    "w8a8": QuantScheme(8, -1, True, act_bits=8),
}


def rtn_checkpoint(dense: ModelWeights, scheme: QuantScheme) -> tuple[ModelWeights, float]:
    """``dense`` with every layer linear RTN-quantized and packed, and the seconds it took."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    # A shallow copy: quantize_weights_rtn consumes its input's dict, ``dense`` is reused.
    quantized = quantize_weights_rtn(dataclasses.replace(dense, tensors=dict(dense.tensors)),
                                     scheme)
    torch.cuda.synchronize()
    return quantized, time.perf_counter() - start


def measure(weights: ModelWeights, batches, context, prefill, bw,
            dtype: torch.dtype = torch.float16) -> dict:
    from engine_fast.runner import FastRunner

    cfg, bs = weights.config, 16
    max_blocks = max(max(batches) * -(-context // bs), -(-prefill // bs)) + 1
    config = EngineConfig(model=cfg, cache=CacheConfig(block_size=bs, num_kv_blocks=max_blocks),
                          scheduler=SchedulerConfig(max_num_seqs=max(batches),
                                                    max_model_len=max(context, prefill)),
                          engine="fast", device="cuda", dtype=dtype)
    runner = FastRunner(config, weights)
    runner.allocate_kv_cache(max_blocks)
    m = runner.model
    weight_bytes = sum(lin.nbytes for layer in m.layers for lin in
                       (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj))
    weight_bytes += m.lm_head.numel() * m.lm_head.element_size()
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    out = {"weight_GB": weight_bytes / 1e9}
    for n in batches:
        batch = decode_batch(n, context, bs)
        ms = triton.testing.do_bench(lambda b=batch: runner.execute(b), warmup=10, rep=100)
        roofline_ms = (weight_bytes + n * context * kv_per_token) / bw * 1e3
        out[f"decode{n}"] = (n / ms * 1e3, roofline_ms / ms)
    pb = prefill_batch(prefill, bs)
    # do_bench's warmup and rep are milliseconds: ~10 prefills, median (20 ms was one call)
    out["prefill_ms"] = triton.testing.do_bench(lambda: runner.execute(pb), warmup=100,
                                                rep=500, return_mode="median")
    torch.cuda.empty_cache()
    return out


def calibration_time(dense: ModelWeights, method: str, layers: int) -> float:
    scheme = QuantScheme(4, 128, sym=method == "gptq")
    options = QuantizeOptions(method, scheme, device="cuda")
    windows = torch.randint(0, dense.config.vocab_size, (128, 512),
                            generator=torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    start = time.perf_counter()
    quantize_model(dense, None, options, progress=False, windows=windows, num_layers=layers)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * dense.config.num_layers / layers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--variants", default="fp16,w8a16,w4a16,w8a8")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--calib-layers", type=int, default=2, help="0 skips AWQ/GPTQ timing")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    bw = copy_bandwidth()
    dense = dummy_weights(llama31_8b_config(args.layers), dtype, "cuda")
    cfg = dense.config
    results, rtn_seconds = {}, {}
    for variant in args.variants.split(","):
        try:
            if variant == "fp16":
                weights = dense
            else:
                weights, rtn_seconds[variant] = rtn_checkpoint(dense, SCHEMES[variant])
            results[variant] = measure(weights, batches, args.context, args.prefill, bw, dtype)
            print(variant, results[variant], flush=True)
        except Exception as e:  # noqa: BLE001 - report the failure, measure the others
            print(f"{variant}: FAILED {type(e).__name__}: {e}", flush=True)
        weights = None
        torch.cuda.empty_cache()
    calib = {m: calibration_time(dense, m, args.calib_layers)
             for m in ("awq", "gptq")} if args.calib_layers else {}

    print(f"\ndevice: {torch.cuda.get_device_name()}  date: {datetime.date.today()}  layers: "
          f"{cfg.num_layers}  copy bandwidth: {bw / 1e12:.2f} TB/s  dtype: {args.dtype}")
    base = results.get("fp16")
    if not results:
        return
    head = " | ".join(f"b{n} tok/s (roofline %)" for n in batches)
    print(f"| variant | weights GB | {head} | prefill {args.prefill} ms | b1 vs fp16 | "
          "prefill vs fp16 |")
    print("|---|---:|" + "---:|" * len(batches) + "---:|---:|---:|")
    for v, r in results.items():
        cells = " | ".join(f"{r[f'decode{n}'][0]:,.1f} ({r[f'decode{n}'][1]:.0%})"
                           for n in batches)
        sp = f"{r[f'decode{batches[0]}'][0] / base[f'decode{batches[0]}'][0]:.2f}x" if base else "-"
        pf = f"{base['prefill_ms'] / r['prefill_ms']:.2f}x" if base else "-"
        print(f"| {v} | {r['weight_GB']:.2f} | {cells} | {r['prefill_ms']:.1f} | {sp} | {pf} |")
    for v, s in rtn_seconds.items():
        print(f"RTN {v}, all {cfg.num_layers} layers on the GPU: {s:.1f} s")
    for m, s in calib.items():
        print(f"{m.upper()} w4 g128, 128 x 512 calibration tokens: {s / 60:.1f} min for "
              f"{cfg.num_layers} layers (timed on {args.calib_layers}, scaled)")


if __name__ == "__main__":
    main()
