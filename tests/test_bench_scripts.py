"""Benchmark scripts that run on CPU: they complete and report what they measure."""

from __future__ import annotations

import re

from bench.host_overhead import main as host_overhead


def test_host_overhead_times_decode_steps_with_a_fixed_logits_runner(capsys):
    host_overhead(["--seqs", "4", "--prompt-len", "16", "--context", "40", "--steps", "5"])
    out = capsys.readouterr().out
    assert re.search(r"host time per decode step: \d+\.\d\d ms \(4 sequences at context ~40",
                     out)


def test_hf_generate_rows_time_decode_and_prefill_through_transformers():
    import torch

    from bench.hf_generate import hf_rows
    from twinfer.dummy import SHAPE_PRESETS

    tiny = {**SHAPE_PRESETS["llama-3.1-8b"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2}
    rows = hf_rows(tiny, [1, 3], context=24, prefill=32, dtype=torch.float32, device="cpu",
                   new_tokens=8)
    assert [r["what"] for r in rows] == ["decode batch 1, context 24",
                                         "decode batch 3, context 24", "prefill 32 tokens"]
    # Decode is a difference of two timed calls: positive unless the CPU is very noisy.
    assert rows[2]["ms"] > 0 and all(r["ms"] == r["ms"] and r["tok/s"] != 0 for r in rows)
