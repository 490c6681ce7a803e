"""Serving-style throughput of the whole engine (scheduler, runner, sampler, detokenizer) at
Llama-3.1-8B shapes with random weights: N concurrent requests of fixed input and output
lengths, as in LMDeploy's and vLLM's offline throughput benchmarks (CUDA).

    python -m bench.engine_throughput [--requests 100] [--input-len 1024] [--output-len 1024]
        [--no-async-scheduling] [--temperature 0.8 --top-p 0.95]

The workload's prefill phase runs once first, untimed, so that Triton's JIT compilation of the
prefill path's kernels is not counted (the decode kernels compile while the CUDA graphs are
captured).
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


def serving_throughput(requests: int = 100, input_len: int = 1024, output_len: int = 1024,
                       layers: int = 32, engine: str = "fast", async_scheduling: bool = True,
                       temperature: float = 0.0, top_p: float = 1.0,
                       kv_cache_dtype: str = "auto") -> dict:
    """Runs the benchmark once; returns output tokens, seconds, output and total tokens/s, and
    engine steps."""
    weights = dummy_weights(llama31_8b_config(layers), torch.float16, "cuda")
    cfg = weights.config
    total = input_len + output_len
    blocks = requests * -(-total // 16) + 16
    max_num_batched_tokens = 8192
    config = EngineConfig(model=cfg, cache=CacheConfig(num_kv_blocks=blocks,
                                                       enable_prefix_caching=False,
                                                       kv_cache_dtype=kv_cache_dtype),
                          scheduler=SchedulerConfig(max_num_seqs=requests,
                                                    max_num_batched_tokens=max_num_batched_tokens,
                                                    max_model_len=total + 16),
                          engine=engine, device="cuda", dtype=torch.float16,
                          async_scheduling=async_scheduling)
    llm = LLMEngine(config, weights, synthetic_tokenizer(cfg.vocab_size))
    del weights
    torch.cuda.empty_cache()
    rng = random.Random(0)
    # Warm-up: the workload's own prefill phase, untimed. Its first steps mix the same prefill
    # chunks with the same numbers of decodes as the timed run's, so every kernel variant that
    # is compiled or loaded on first sight is ready before the clock starts, as in a server
    # that has run for a while. With only a few warm-up requests the timed run's
    # prefill steps still compiled: on an H100 they took 3.68 s against 2.64 s once warm
    # (bench/RESULTS.md, fifteenth session).
    prefill_steps = -(-requests * input_len // max_num_batched_tokens)
    for i in range(requests):
        llm.add_request(f"warm-up-{i}", [rng.randrange(2, cfg.vocab_size)
                                         for _ in range(input_len)],
                        SamplingParams(temperature=0.0, max_tokens=prefill_steps + 4,
                                       ignore_eos=True))
    while llm.has_unfinished_requests():
        llm.step()
    llm.stats = type(llm.stats)()
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=output_len,
                            ignore_eos=True)
    start = time.perf_counter()
    for i in range(requests):
        prompt = [rng.randrange(2, cfg.vocab_size) for _ in range(input_len)]
        llm.add_request(f"r{i}", prompt, params)
    while llm.has_unfinished_requests():
        llm.step()
    elapsed = time.perf_counter() - start
    out_tokens = llm.stats.num_generated_tokens
    return {"output tokens": out_tokens, "seconds": elapsed,
            "output tok/s": out_tokens / elapsed,
            "total tok/s": (out_tokens + requests * input_len) / elapsed,
            "steps": llm.stats.num_steps}


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
    r = serving_throughput(args.requests, args.input_len, args.output_len, args.layers,
                           args.engine, args.async_scheduling, args.temperature, args.top_p)
    print(f"device: {torch.cuda.get_device_name()}  engine: {args.engine}  async scheduling: "
          f"{args.async_scheduling}  temperature: {args.temperature}  top_p: {args.top_p}"
          f"  requests: {args.requests} x ({args.input_len} in, "
          f"{args.output_len} out)")
    print("| output tokens | seconds | output tok/s | total tok/s | steps |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {r['output tokens']} | {r['seconds']:.1f} | {r['output tok/s']:.0f} | "
          f"{r['total tok/s']:.0f} | {r['steps']} |")


if __name__ == "__main__":
    main()
