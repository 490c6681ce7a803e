"""Incremental detokenization and stop strings, on the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest

from twinfer import SamplingParams
from twinfer.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop_string


@pytest.fixture(scope="module")
def tokenizer(smollm2_path, tmp_path_factory):
    return Tokenizer.load(smollm2_path, cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("text", ["Hello, world! Ça va? 你好 🌍 done.", "  spaces\n\nnew lines\t"])
def test_incremental_detokenization_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=tokenizer.encode("Say:"))
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) == detok.text == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_find_stop_string_finds_the_earliest_match():
    assert find_stop_string("abc STOP x END", ["END", "STOP"], new_chars=10) == 4
    assert find_stop_string("no match", ["END"], new_chars=3) is None


def test_stop_string_ends_generation_and_is_not_in_the_text(smollm2_llm):
    prompt = "1, 2, 3, 4, 5, 6,"
    free = smollm2_llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12))[0]
    assert " 8," in free.outputs[0].text
    out = smollm2_llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12,
                                                        stop=[" 8,"]))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == " 8,"
    assert out.outputs[0].text == free.outputs[0].text.split(" 8,")[0]


def test_stop_token_ids_end_generation(smollm2_llm):
    free = smollm2_llm.generate(["1, 2, 3,"], SamplingParams(temperature=0.0, max_tokens=8))[0]
    stop_id = free.outputs[0].token_ids[2]
    out = smollm2_llm.generate(["1, 2, 3,"], SamplingParams(
        temperature=0.0, max_tokens=8, stop_token_ids=[stop_id]))[0]
    assert out.outputs[0].token_ids == free.outputs[0].token_ids[:3]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_id


def test_prompt_logprobs_match_the_models_next_token_distribution(smollm2_llm):
    prompt = "The capital of France is Paris"
    out = smollm2_llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=1,
                                                        logprobs=3, temperature=0.0))[0]
    ids = out.prompt_token_ids
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    paris = out.prompt_logprobs[-1][ids[-1]].logprob
    greedy = smollm2_llm.generate([prompt[: -len(" Paris")]], SamplingParams(
        max_tokens=1, logprobs=3, temperature=0.0))[0]
    first = greedy.outputs[0].logprobs[0]
    assert ids[-1] in first  # " Paris" is among the top 3 after "The capital of France is"
    assert abs(first[ids[-1]].logprob - paris) < 1e-4
    assert len(out.outputs[0].logprobs[0]) >= 3
