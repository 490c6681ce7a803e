"""engine_fast computes what engine_torch computes: same ScheduledBatch stream, logits
compared (Triton interpreter on CPU; real kernels with -m gpu in test_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB, collect_logits

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: only summation order differs. fp16: both engines round activations to fp16 at
# different points (fused residual/norm, fp32 rotary), ~2^-11 relative on logits of size ~1.
ATOL = {torch.float32: 1e-4, torch.float16: 1e-2}


def prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, TINY_VOCAB, (n,), generator=g).tolist() for n in (1, 19, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("chunk", [7, 2048])
@pytest.mark.parametrize("arch", ARCHS)
def test_fast_logits_match_torch(tiny_model_factory, arch, chunk, dtype):
    path = tiny_model_factory(arch)
    ps = prompts(1)
    decoded = [prompts(2)[2][:6] for _ in ps]  # decode steps exercise the decode kernel
    ref = collect_logits(path, ps, chunk=chunk, decode_tokens=decoded, dtype=dtype,
                         device=DEVICE)
    fast = collect_logits(path, ps, chunk=chunk, decode_tokens=decoded, dtype=dtype,
                          engine="fast", device=DEVICE)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # plain, qkv bias, q/k norms
def test_fast_fused_one_row_decode_matches_torch(tiny_model_factory, monkeypatch, arch, dtype):
    """Batch-1 decode through the GEMVs with norm / SiLU / residual fused in and rotary + KV
    write inside the attention kernel gives engine_torch's logits."""
    from engine_fast.model import FastLlama

    calls = []
    one_row = FastLlama._forward_one_row
    monkeypatch.setattr(FastLlama, "_forward_one_row",
                        lambda self, *a: calls.append(1) or one_row(self, *a))
    path = tiny_model_factory(arch)
    ps, decoded = prompts(3)[1:2], [prompts(4)[2][:6]]
    ref = collect_logits(path, ps, chunk=2048, decode_tokens=decoded, dtype=dtype,
                         device=DEVICE)
    fast = collect_logits(path, ps, chunk=2048, decode_tokens=decoded, dtype=dtype,
                          engine="fast", device=DEVICE, fuse_one_row=True)
    # Every decode step took the fused path (on CUDA it ran into the batch-1 graph's capture).
    assert len(calls) == 6 if DEVICE == "cpu" else calls
    torch.testing.assert_close(fast[0], ref[0], atol=ATOL[dtype], rtol=0)
