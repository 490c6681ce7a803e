"""The real SmolLM2-135M-Instruct (dequantized from its Q4_1 GGUF) against transformers."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import collect_logits

from twinfer import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "import numpy as np\n\nx = np.",
    "The quick brown fox",
    "In 1969, the first humans",
]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def hf_smollm2_fp64(hf_smollm2):
    return copy.deepcopy(hf_smollm2).double()


@pytest.mark.parametrize("chunk", [1, 7, 16, 2048])
def test_smollm2_logits_match_transformers(smollm2_path, smollm2_llm, hf_smollm2,
                                           hf_smollm2_fp64, chunk):
    """SmolLM2's logits reach +-20, so fp32 rounding alone moves them by ~5e-5: transformers'
    own fp32 logits sit up to 5.8e-5 from its fp64 ones. Two fp32 implementations that sum
    in different orders (batched GEMM shapes, chunked attention) can therefore differ by
    slightly more than 1e-4 (1.01e-4 seen once). So the 1e-4 bound is checked against the
    exact (fp64) transformers logits, and agreement with transformers' fp32 within 2e-4."""
    prompts = [smollm2_llm.tokenizer.encode(p) for p in PROMPTS[:3]]
    decoded = [[28, 253, 1010], [30, 2], [5, 6, 7, 8]]
    ours = collect_logits(smollm2_path, prompts, chunk=chunk, decode_tokens=decoded)
    for p, d, o in zip(prompts, decoded, ours):
        ids = torch.tensor([p + d])
        with torch.no_grad():
            exact = hf_smollm2_fp64(ids).logits[0]
            ref = hf_smollm2(ids).logits[0]
        torch.testing.assert_close(o.double(), exact, atol=1e-4, rtol=0)
        torch.testing.assert_close(o, ref, atol=2e-4, rtol=0)


def test_smollm2_greedy_matches_transformers_generate(smollm2_llm, hf_smollm2):
    params = SamplingParams(temperature=0.0, max_tokens=32)  # both stop at <|im_end|>
    outputs = smollm2_llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outputs):
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            ref = hf_smollm2.generate(ids, max_new_tokens=32, do_sample=False,
                                      attention_mask=torch.ones_like(ids))
        assert out.outputs[0].token_ids == ref[0, ids.shape[1]:].tolist(), prompt


def test_smollm2_chat_answers_paris(smollm2_llm):
    out = smollm2_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0.0, max_tokens=24))[0]
    assert "Paris" in out.outputs[0].text
    assert out.finish_reason == "stop"  # ended on <|im_end|>, which is not in the text
    assert "<|im_end|>" not in out.outputs[0].text
