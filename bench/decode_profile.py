"""Where a decode step's (or a prefill's) GPU time goes, kernel by kernel (CUDA only).

    python -m bench.decode_profile [--batch 1] [--context 1024] [--layers 32] [--steps 20]
        [--quantization w8a8] [--prefill 2048]

Llama-3.1-8B shapes with random weights, one decode step of ``--batch`` sequences at
``--context``, replayed from the CUDA graph FastRunner captured. torch.profiler (CUPTI) records
the kernels inside the replays; the table lists each kernel's device time per step and its
share, and the last line compares their sum with the replay's wall time per step: the
difference is the time between kernels (launch gaps and pipeline drain), which fusing kernels
removes and a faster kernel does not.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from bench.fast_roofline import decode_batch, llama31_8b_config, prefill_batch
from twinfer.config import KV_CACHE_DTYPES, CacheConfig, EngineConfig, SchedulerConfig
from twinfer.dummy import dummy_weights


def main(argv: list[str] | None = None) -> None:
    from engine_fast.runner import FastRunner

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefill", type=int, default=0,
                    help="profile one prompt of this many tokens instead of a decode step")
    ap.add_argument("--quantization", default=None, help="e.g. w4a16-g128-sym")
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    ap.add_argument("--cublas-only", action="store_true",
                    help="dense linears through cuBLAS at one row (no dense_gemv, unfused): A/B")
    ap.add_argument("--unfused", action="store_true",
                    help="one-row steps without the fused GEMVs (separate norm, SiLU, add): A/B")
    ap.add_argument("--gemv-inputs", choices=["auto", "fused", "separate"], default="auto",
                    help="one-row step: norms / SiLU inside the GEMVs or as separate kernels "
                         "(auto: inside for dense weights only): A/B")
    ap.add_argument("--no-int8-from-norms", action="store_true",
                    help="W8A8: each linear quantizes its own input (no int8 out of the norms "
                         "and SiLU-and-mul): A/B")
    ap.add_argument("--no-pdl", action="store_true",
                    help="fused one-row step without programmatic dependent launches: A/B")
    args = ap.parse_args(argv)
    bs = 16
    weights = dummy_weights(llama31_8b_config(args.layers), torch.float16, "cuda")
    if args.quantization:
        from twinfer.online_quant import quantize_weights_rtn
        from twinfer.quant import QuantScheme
        weights = quantize_weights_rtn(weights, QuantScheme.parse(args.quantization))
    blocks = max(args.batch * -(-args.context // bs), -(-args.prefill // bs)) + 1
    config = EngineConfig(model=weights.config,
                          cache=CacheConfig(block_size=bs, num_kv_blocks=blocks,
                                            kv_cache_dtype=args.kv_cache_dtype),
                          scheduler=SchedulerConfig(max_num_seqs=args.batch,
                                                    max_model_len=max(args.context,
                                                                      args.prefill)),
                          engine="fast", device="cuda", dtype=torch.float16)
    runner = FastRunner(config, weights)
    del weights
    if args.no_pdl:
        runner.model.pdl = False
    runner.model.int8_from_norms = not args.no_int8_from_norms
    if args.unfused or args.cublas_only:
        runner.model.fuse_one_row = False
    if args.gemv_inputs != "auto":
        runner.model.fuse_gemv_inputs = args.gemv_inputs == "fused"
    if args.cublas_only:
        for layer in runner.model.layers:
            for linear in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
                linear.row_gemv = False
    runner.allocate_kv_cache(blocks)
    batch = (prefill_batch(args.prefill, bs) if args.prefill else
             decode_batch(args.batch, args.context, bs))
    wall_ms = triton.testing.do_bench(lambda: runner.execute(batch), warmup=10, rep=100)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            runner.execute(batch)
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in event.name:
            entry = per_kernel[event.name]
            entry[0] += event.device_time_total / args.steps
            entry[1] += 1 / args.steps
    total_us = sum(us for us, _ in per_kernel.values())
    work = (f"prefill of {args.prefill} tokens" if args.prefill else
            f"batch {args.batch}  context {args.context}")
    print(f"device: {torch.cuda.get_device_name()}  {work}"
          f"  layers {args.layers}  quantization {args.quantization or 'none (fp16)'}")
    print("| kernel | launches per step | us per step | share |")
    print("|---|---:|---:|---:|")
    for name, (us, calls) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:20]:
        print(f"| {name[:70]} | {calls:.0f} | {us:.0f} | {us / total_us:.1%} |")
    print(f"kernels {total_us / 1e3:.3f} ms per step; replay wall {wall_ms:.3f} ms per step "
          f"({(args.prefill or args.batch) / wall_ms * 1e3:.1f} tok/s); "
          f"between kernels {wall_ms - total_us / 1e3:.3f} ms")


if __name__ == "__main__":
    main()
