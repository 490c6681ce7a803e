"""engine_torch's logits equal Hugging Face transformers' on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB, collect_logits

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
ATOL = 1e-4  # fp32: only summation order differs between the two implementations


def hf_logits(model_path, token_ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0]


def random_prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, TINY_VOCAB, (n,), generator=g).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logits_match_transformers(tiny_model_factory, arch):
    path = tiny_model_factory(arch)
    prompt = random_prompt(37, seed=1)
    ours = collect_logits(path, [prompt], chunk=2048)[0]
    torch.testing.assert_close(ours, hf_logits(path, prompt), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_step_logits_match_transformers(tiny_model_factory, arch):
    path = tiny_model_factory(arch)
    prompt, decoded = random_prompt(20, seed=2), random_prompt(12, seed=3)
    ours = collect_logits(path, [prompt], chunk=2048, decode_tokens=[decoded])[0]
    torch.testing.assert_close(ours, hf_logits(path, prompt + decoded), atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_of_different_lengths_matches_transformers(tiny_model_factory, arch):
    path = tiny_model_factory(arch)
    prompts = [random_prompt(n, seed=10 + n) for n in (1, 5, 16, 17, 40)]
    decoded = [random_prompt(4, seed=50 + i) for i in range(len(prompts))]
    ours = collect_logits(path, prompts, chunk=2048, decode_tokens=decoded)
    for p, d, o in zip(prompts, decoded, ours):
        torch.testing.assert_close(o, hf_logits(path, p + d), atol=ATOL, rtol=0)


@pytest.mark.parametrize("chunk", [1, 7, 16, 2048])
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_matches_transformers(tiny_model_factory, arch, chunk):
    path = tiny_model_factory(arch)
    prompts = [random_prompt(45, seed=4), random_prompt(23, seed=5)]
    ours = collect_logits(path, prompts, chunk=chunk)
    for p, o in zip(prompts, ours):
        torch.testing.assert_close(o, hf_logits(path, p), atol=ATOL, rtol=0)
