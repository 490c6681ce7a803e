"""The sampler's filters, penalties, seeds and logprobs, on hand-made logits."""

from __future__ import annotations

import math

import torch

from twinfer.sampling import (
    Sampler,
    SamplerInput,
    SamplingParams,
    apply_penalties,
    draw_rows,
    sample_row,
)


def draw_many(logits, params, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {sample_row(logits, params, g) for _ in range(n)}


def test_greedy_picks_the_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample_row(logits, SamplingParams(temperature=0.0), None) == 1


def test_top_k_keeps_only_the_k_best():
    logits = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6])
    assert draw_many(logits, SamplingParams(top_k=2)) == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert draw_many(probs.log(), SamplingParams(top_p=0.75)) == {0, 1}
    assert draw_many(probs.log(), SamplingParams(top_p=0.1)) == {0}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert draw_many(probs.log(), SamplingParams(min_p=0.25)) == {0, 1, 2}


def test_temperature_sampling_covers_the_distribution():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample_row(probs.log(), SamplingParams(), g)
                                          for _ in range(4000)]), minlength=4)
    torch.testing.assert_close(counts / 4000, probs, atol=0.03, rtol=0)


def test_same_seed_same_draws():
    logits = torch.randn(1000)
    a = [sample_row(logits, SamplingParams(), torch.Generator().manual_seed(5))
         for _ in range(3)]
    assert len(set(a)) == 1


def _batch(params, prompt, output):
    return SamplerInput([params], [None], [prompt], [output])


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_penalties(logits.clone(), _batch(SamplingParams(repetition_penalty=2.0),
                                                 [0], [1]))
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0]]))


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.zeros(1, 4)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, _batch(params, [3, 3], [1, 1, 2]))
    torch.testing.assert_close(out, torch.tensor([[0.0, -1.0, -0.75, 0.0]]))


def test_logprobs_are_the_raw_distribution_with_top_n():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    params = SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=1.5)
    out = Sampler()(logits, _batch(params, [2], []))
    token_lp, ids, values = out.logprobs[0]
    expected = torch.log_softmax(logits[0], -1)
    assert ids == [2, 1]
    assert math.isclose(values[0], float(expected[2]), abs_tol=1e-6)
    assert math.isclose(token_lp, float(expected[out.token_ids[0]]), abs_tol=1e-6)


def test_batched_rows_keep_each_rows_own_filters():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.75), SamplingParams(min_p=0.4),
              SamplingParams(temperature=0.5, top_k=3, top_p=0.95), SamplingParams()]
    torch.manual_seed(0)
    seen = [set() for _ in params]
    for _ in range(300):
        for i, t in enumerate(draw_rows(probs.log().repeat(len(params), 1), params).tolist()):
            seen[i].add(t)
    assert seen == [{0, 1}, {0, 1, 2}, {0, 1, 2}, {0, 1, 2}, {0, 1, 2, 3, 4}]


def test_batched_draws_follow_each_rows_distribution():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    params = [SamplingParams(), SamplingParams(temperature=0.5)]
    torch.manual_seed(1)
    draws = torch.stack([draw_rows(probs.log().repeat(2, 1), params) for _ in range(4000)])
    sharpened = probs ** 2 / (probs ** 2).sum()  # temperature 0.5 squares the probabilities
    for row, expected in enumerate([probs, sharpened]):
        counts = torch.bincount(draws[:, row], minlength=4)
        torch.testing.assert_close(counts / 4000, expected, atol=0.03, rtol=0)


def test_sampler_draws_seeded_rows_alone_and_unseeded_rows_together():
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=0.0), SamplingParams(seed=3), SamplingParams(),
              SamplingParams(top_p=0.5)]
    gens = [None, torch.Generator().manual_seed(3), None, None]
    out = Sampler()(logits, SamplerInput(params, gens, [[]] * 4, [[]] * 4))
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[1] == sample_row(logits[1], params[1], torch.Generator().manual_seed(3))
    probs = torch.softmax(logits[3], -1)
    kept = set(torch.argsort(probs, descending=True)[:int((probs.sort(descending=True).values
                                                          .cumsum(0) < 0.5).sum()) + 1].tolist())
    assert out.token_ids[3] in kept
