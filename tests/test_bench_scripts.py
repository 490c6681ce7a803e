"""Benchmark scripts that run on CPU: they complete and report what they measure."""

from __future__ import annotations

import re

from bench.host_overhead import main as host_overhead


def test_host_overhead_times_decode_steps_with_a_fixed_logits_runner(capsys):
    host_overhead(["--seqs", "4", "--prompt-len", "16", "--context", "40", "--steps", "5"])
    out = capsys.readouterr().out
    assert re.search(r"host time per decode step: \d+\.\d\d ms \(4 sequences at context ~40",
                     out)
