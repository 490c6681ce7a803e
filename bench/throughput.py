"""Continuous-batching throughput: aggregate output tokens/s for 1 request vs N concurrent.

    python -m bench.throughput [--model smollm2-135m] [--concurrency 32] [--output-len 128]

Decode of a small model is bound by reading its weights once per step, whatever the batch, so
N concurrent sequences should approach N times the single-request rate until compute or
per-sequence overheads (attention gather, sampling, detokenization) take over.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from twinfer import LLM, SamplingParams

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a hash table works.",
    "List some facts about the Moon.",
    "Describe the water cycle for a ten-year-old.",
]


def run(llm: LLM, num_requests: int, output_len: int) -> tuple[float, int]:
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} (request {i})" for i in range(num_requests)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--engine", default="torch")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()

    llm = LLM(args.model, engine=args.engine, dtype=args.dtype, max_model_len=1024,
              max_num_seqs=max(args.concurrency, 1))
    run(llm, 1, 8)  # warm-up
    rows = []
    for n in (1, args.concurrency):
        elapsed, tokens = run(llm, n, args.output_len)
        rows.append((n, tokens, elapsed, tokens / elapsed))
    device = llm.config.device
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.machine()
    print(f"model={args.model} engine={llm.config.engine} dtype={llm.config.dtype} "
          f"device={device} ({name}, {torch.get_num_threads()} threads)")
    print("| concurrent requests | output tokens | seconds | aggregate tok/s |")
    print("|---:|---:|---:|---:|")
    for n, tokens, elapsed, rate in rows:
        print(f"| {n} | {tokens} | {elapsed:.2f} | {rate:.1f} |")
    print(f"continuous batching speed-up: {rows[1][3] / rows[0][3]:.1f}x")


if __name__ == "__main__":
    main()
