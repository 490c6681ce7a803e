"""Serving-style throughput of the whole engine (scheduler, runner, sampler, detokenizer) at
Llama-3.1-8B shapes with random weights: N concurrent requests of fixed input and output
lengths, as in LMDeploy's and vLLM's offline throughput benchmarks (CUDA).

    python -m bench.engine_throughput [--requests 100] [--input-len 1024] [--output-len 1024]
        [--no-async-scheduling] [--temperature 0.8 --top-p 0.95]

One short request runs first, untimed, so that Triton's JIT compilation of the prefill kernels
is not counted (the decode kernels compile while the CUDA graphs are captured).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from bench.fast_roofline import llama31_8b_config
from twinfer.config import CacheConfig, EngineConfig, SchedulerConfig
from twinfer.dummy import dummy_weights, synthetic_tokenizer
from twinfer.engine import LLMEngine
from twinfer.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=1024)
    ap.add_argument("--engine", default="fast")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    args = ap.parse_args()
    weights = dummy_weights(llama31_8b_config(args.layers), torch.float16, "cuda")
    cfg = weights.config
    total = args.input_len + args.output_len
    blocks = args.requests * -(-total // 16) + 16
    config = EngineConfig(model=cfg, cache=CacheConfig(num_kv_blocks=blocks,
                                                       enable_prefix_caching=False),
                          scheduler=SchedulerConfig(max_num_seqs=args.requests,
                                                    max_num_batched_tokens=8192,
                                                    max_model_len=total + 16),
                          engine=args.engine, device="cuda", dtype=torch.float16,
                          async_scheduling=args.async_scheduling)
    engine = LLMEngine(config, weights, synthetic_tokenizer(cfg.vocab_size))
    torch.cuda.empty_cache()
    rng = random.Random(0)
    for i in range(min(args.requests, 9)):  # full and partial prefill chunks, then decodes
        engine.add_request(f"warm-up-{i}", [rng.randrange(2, cfg.vocab_size)
                                            for _ in range(args.input_len)],
                           SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    engine.stats = type(engine.stats)()
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.output_len, ignore_eos=True)
    start = time.perf_counter()
    for i in range(args.requests):
        prompt = [rng.randrange(2, cfg.vocab_size) for _ in range(args.input_len)]
        engine.add_request(f"r{i}", prompt, params)
    while engine.has_unfinished_requests():
        engine.step()
    elapsed = time.perf_counter() - start
    print(f"device: {torch.cuda.get_device_name()}  engine: {args.engine}  async scheduling: "
          f"{args.async_scheduling}  temperature: {args.temperature}  top_p: {args.top_p}"
          f"  requests: {args.requests} x ({args.input_len} in, "
          f"{args.output_len} out)")
    print("| output tokens | seconds | output tok/s | total tok/s | steps |")
    print("|---:|---:|---:|---:|---:|")
    out_tokens = engine.stats.num_generated_tokens
    print(f"| {out_tokens} | {elapsed:.1f} | {out_tokens / elapsed:.0f} | "
          f"{(out_tokens + args.requests * args.input_len) / elapsed:.0f} | "
          f"{engine.stats.num_steps} |")


if __name__ == "__main__":
    main()
