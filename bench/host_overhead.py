"""Host-side time of one engine step (scheduler, sampler, detokenizer, outputs), without a model.

    python -m bench.host_overhead [--seqs 100] [--prompt-len 1024] [--context 2048]

A runner that returns fixed logits replaces the model, so what is timed is the Python work a
GPU step waits on when nothing overlaps it: on the H100, a batch-100 decode step's GPU time is
~12-20 ms, so every millisecond here is 5-8% of serving throughput. Runs anywhere (CPU);
one torch thread, so that the numbers do not depend on OpenMP contention.
"""

from __future__ import annotations

import argparse
import time

import torch

from twinfer.batch import ScheduledBatch
from twinfer.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from twinfer.dummy import SHAPE_PRESETS, synthetic_tokenizer
from twinfer.engine import LLMEngine
from twinfer.sampling import SamplingParams


class FixedLogitsRunner:
    """A Runner whose logits put all mass on one token that changes every step."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.steps = 0

    def allocate_kv_cache(self, num_blocks: int) -> None:
        pass

    def execute(self, batch: ScheduledBatch, device_tokens=None) -> torch.Tensor:
        self.steps += 1
        logits = torch.zeros(len(batch.logits_indices), self.vocab_size)
        logits[:, 5 + self.steps * 7 % (self.vocab_size - 10)] = 1.0
        return logits


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=100)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--context", type=int, default=2048, help="context when timing starts")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--vocab", type=int, default=1024, help="small: the sampler is not timed")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = ModelConfig.from_hf({**SHAPE_PRESETS["llama-3.1-8b"], "vocab_size": args.vocab})
    total = args.context + args.steps + 16
    config = EngineConfig(
        model=cfg, cache=CacheConfig(num_kv_blocks=args.seqs * (-(-total // 16) + 1),
                                     enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=args.seqs, max_num_batched_tokens=8192,
                                  max_model_len=total),
        engine="torch", device="cpu", dtype=torch.float32)
    engine = LLMEngine(config, None, synthetic_tokenizer(args.vocab),
                       runner=FixedLogitsRunner(args.vocab))
    params = SamplingParams(temperature=0.0, max_tokens=total - args.prompt_len, ignore_eos=True)
    for i in range(args.seqs):
        engine.add_request(f"r{i}", [10 + (j * 7 + i) % (args.vocab - 20)
                                     for j in range(args.prompt_len)], params)
    while min((s.num_tokens for s in engine.scheduler.running), default=0) < args.context:
        engine.step()  # prefill, then decode up to the context where timing starts
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    ms = (time.perf_counter() - start) / args.steps * 1e3
    print(f"host time per decode step: {ms:.2f} ms ({args.seqs} sequences at context "
          f"~{args.context}, fixed-logits runner, 1 torch thread)")


if __name__ == "__main__":
    main()
