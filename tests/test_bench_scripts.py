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


def test_fast_roofline_target_table_marks_each_figure_met_or_not(capsys):
    from bench.fast_roofline import print_targets

    rows = [{"what": "decode batch 1, context 1024", "ms": 4.0, "fraction": 0.872},
            {"what": "decode batch 64, context 1024", "ms": 7.0, "fraction": 0.65},
            {"what": "prefill 2048 tokens", "ms": 50.0, "fraction": 0.834},
            {"what": "transformers decode batch 1, context 1024", "ms": 20.0},
            {"what": "serving 100 x (1024 in, 1024 out)", "output tok/s": 5000.0}]
    print_targets(rows, [1, 64], 1024, 2048, "GPU X")
    out = capsys.readouterr().out.splitlines()
    assert "| decode batch 1, context 1024: >= 85% of roofline | 87.2% | yes |" in out
    assert "| decode batch 64, context 1024: >= 70% of roofline | 65.0% | no |" in out
    assert "| prefill 2048 tokens: >= 60% of roofline | 83.4% | yes |" in out
    assert any("5,792" in line and "| 5,000 | no (on GPU X) |" in line for line in out)
    assert "| decode batch 1, context 1024: speed-up over transformers generate | 5.0x | " \
           "reported |" in out
    assert not any("attention" in line for line in out)  # not measured: not listed


def test_sass_loop_counts_the_dot_kernels_k_loop_compiled_offline_for_hopper():
    import os
    import subprocess
    import sys

    # The tests run Triton's interpreter; compiling for sm_90 needs the real JIT.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "bench.sass_loop", "--rows", "16", "--block-n",
                          "64", "--warps", "4", "--stages", "2"], env=env, capture_output=True,
                         text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__))
                         ).stdout
    header = re.search(r"(\d+) instructions per thread per K tile, (\d+\.\d) per weight code", out)
    counts = dict(re.findall(r"^\| ([A-Z0-9_]+) \| (\d+) \|$", out, re.M))
    # A 64 x 128 weight tile on 4 warps: 8 wgmmas of K 16, and every code unpacked in the loop
    assert int(counts["HGMMA"]) == 8 and int(counts["LOP3"]) >= 32
    assert int(header.group(1)) == sum(map(int, counts.values()))
