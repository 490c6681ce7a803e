"""transformers' ``generate`` on the same workloads as bench/fast_roofline.py: the baseline the
issue compares engine_fast with (CUDA for real figures; runs anywhere).

    python -m bench.hf_generate [--layers 32] [--batches 1,64] [--context 1024] [--prefill 2048]

Random weights at Llama-3.1-8B shapes (the same config as fast_roofline), fp16, eager
``LlamaForCausalLM`` with its default attention. A decode step's time is generate's time for
``--new-tokens`` + 1 tokens minus its time for 1 token (the prompt's prefill), over the new
tokens; prefill is generate's time for one token after a ``--prefill``-token prompt. Greedy,
no early stop (min_new_tokens = max_new_tokens); each call is timed the faster of two runs.
"""

from __future__ import annotations

import argparse
import time

import torch


def build_model(config: dict, dtype: torch.dtype, device: str):
    """An HF model with random weights made on ``device`` in ``dtype`` (no float32 copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _generate_s(model, batch: int, prompt: int, new_tokens: int, device: str) -> float:
    """Seconds for one generate call, timed on its second run (the first pays the shape's
    one-off costs: cuBLAS heuristics, allocator growth)."""
    return min(_generate_once(model, batch, prompt, new_tokens, device) for _ in range(2))


def _generate_once(model, batch: int, prompt: int, new_tokens: int, device: str) -> float:
    ids = torch.randint(10, model.config.vocab_size - 10, (batch, prompt), device=device)
    mask = torch.ones_like(ids)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


@torch.inference_mode()
def hf_rows(config: dict, batches: list[int], context: int, prefill: int, dtype: torch.dtype,
            device: str, new_tokens: int = 16) -> list[dict]:
    """Rows like fast_roofline's: decode per batch size at ``context``, then prefill."""
    model = build_model(config, dtype, device)
    _generate_s(model, 1, 8, 2, device)  # warm-up (kernel selection, allocator)
    rows = []
    for n in batches:
        prompt = context - 1  # the timed steps decode at contexts context .. context + new
        first = _generate_s(model, n, prompt, 1, device)
        total = _generate_s(model, n, prompt, new_tokens + 1, device)
        ms = (total - first) / new_tokens * 1e3
        rows.append({"what": f"decode batch {n}, context {context}", "ms": ms,
                     "tok/s": n / ms * 1e3})
    ms = _generate_s(model, 1, prefill, 1, device) * 1e3
    rows.append({"what": f"prefill {prefill} tokens", "ms": ms, "tok/s": prefill / ms * 1e3})
    del model
    return rows


def main(argv: list[str] | None = None) -> None:
    from bench.fast_roofline import llama31_8b_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = hf_rows(llama31_8b_config(args.layers), [int(b) for b in args.batches.split(",")],
                   args.context, args.prefill, torch.float16, device, args.new_tokens)
    print("| transformers generate | ms | tok/s |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['what']} | {r['ms']:.3f} | {r['tok/s']:.1f} |")


if __name__ == "__main__":
    main()
