"""Evaluation (twinfer/evaluate.py): perplexity, KL divergence and task accuracy against
independent computations with transformers, the data loaders, the CLI."""

from __future__ import annotations

import argparse
import bz2
import json
import math
import random

import numpy as np
import pytest
import torch

from twinfer import LLM, SamplingParams
from twinfer.eval_data import load_text, load_wikitext2, wikitext2_gptq_text
from twinfer.eval_scoring import ScoreRequest, iter_aligned, iter_logprobs
from twinfer.evaluate import evaluate_tasks, kl_divergence, perplexity


def _llm(path, engine="torch", max_num_batched_tokens=48):
    # A small token budget, so windows are chunked across batches and packed together.
    return LLM(str(path), engine=engine, dtype="float32", max_model_len=128, max_num_seqs=4,
               max_num_batched_tokens=max_num_batched_tokens, num_kv_blocks=64)


@pytest.fixture(scope="module")
def tiny_path(tiny_model_factory):
    return tiny_model_factory("llama", seed=0, logit_scale=20.0)


@pytest.fixture(scope="module")
def tiny_llm(tiny_path):
    return _llm(tiny_path)


@pytest.fixture(scope="module")
def hf_model(tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()


def _words(n, seed=0):
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(2, 256)}" for _ in range(n))


def _hf_logprobs(model, ids) -> torch.Tensor:
    """float64 log-probs [len(ids), vocab] from one plain full-sequence forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return logits.float().log_softmax(-1).double()


def _hf_windows(tokenizer, text, ctx):
    ids = tokenizer.encode(text)
    return [ids[i * ctx:(i + 1) * ctx] for i in range(len(ids) // ctx)]


# -- perplexity -------------------------------------------------------------------------------


def test_perplexity_equals_exp_mean_nll_of_a_transformers_forward(tiny_llm, hf_model):
    text, ctx = _words(300), 64
    nll, n = 0.0, 0
    for w in _hf_windows(tiny_llm.tokenizer, text, ctx):
        lp = _hf_logprobs(hf_model, w)
        nll -= float(lp[:-1].gather(1, torch.tensor(w[1:])[:, None]).sum())
        n += ctx - 1
    r = perplexity(tiny_llm, text, ctx=ctx)
    assert (r.num_windows, r.num_tokens, r.ctx) == (300 // ctx, 300 // ctx * (ctx - 1), ctx)
    assert r.ppl == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert r.nll_mean == pytest.approx(nll / n, rel=1e-4)


def test_perplexity_max_windows_scores_only_the_first_windows(tiny_llm):
    text = _words(300)
    first_two = perplexity(tiny_llm, text, ctx=64, max_windows=2)
    alone = perplexity(tiny_llm, " ".join(text.split()[:128]), ctx=64)
    assert (first_two.num_windows, first_two.num_tokens) == (2, 126)
    assert first_two.ppl == pytest.approx(alone.ppl, rel=1e-6)


def test_perplexity_of_text_shorter_than_a_window_raises(tiny_llm):
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(tiny_llm, _words(10), ctx=64)


def test_perplexity_fast_engine_matches_torch_engine(tiny_path, tiny_llm):
    pytest.importorskip("triton")
    fast = _llm(tiny_path, engine="fast", max_num_batched_tokens=32)
    text = _words(60)
    got = perplexity(fast, text, ctx=24, max_windows=2)  # 2 windows over 2 batches of 32
    assert got.ppl == pytest.approx(perplexity(tiny_llm, text, ctx=24, max_windows=2).ppl,
                                    rel=1e-4)


def test_scoring_frees_every_kv_block_even_when_stopped_early(tiny_llm):
    blocks = tiny_llm.engine.block_manager
    requests = [ScoreRequest(list(range(2, 62))), ScoreRequest(list(range(3, 63)), first=30)]
    pieces = iter_logprobs(tiny_llm.engine, requests)
    next(pieces)
    assert blocks.num_free_blocks < blocks.num_blocks
    pieces.close()
    assert blocks.num_free_blocks == blocks.num_blocks
    perplexity(tiny_llm, _words(300), ctx=64)
    assert blocks.num_free_blocks == blocks.num_blocks


def test_scoring_covers_wanted_positions_once_in_order_whatever_the_chunking(tiny_llm):
    requests = [ScoreRequest(list(range(2, 62))), ScoreRequest(list(range(3, 40)), first=30),
                ScoreRequest(list(range(9, 20)), first=5)]
    whole = {}
    for budget in (7, 48, 128):
        rows = {i: [] for i in range(len(requests))}
        for idx, first, lp in iter_logprobs(tiny_llm.engine, requests, max_batch_tokens=budget):
            assert first == requests[idx].first + sum(len(r) for r in rows[idx])
            rows[idx].append(lp.clone())
        got = {i: torch.cat(r) for i, r in rows.items()}
        for i, r in enumerate(requests):
            assert got[i].shape == (r.num_positions, 256)
            if i in whole:
                torch.testing.assert_close(got[i], whole[i], rtol=1e-5, atol=1e-5)
        whole = got


def test_aligned_pieces_pair_the_same_positions_across_batch_sizes(tiny_llm):
    requests = [ScoreRequest(list(range(2, 62))), ScoreRequest(list(range(3, 40)), first=3)]
    a = iter_logprobs(tiny_llm.engine, requests, max_batch_tokens=16)
    b = iter_logprobs(tiny_llm.engine, requests, max_batch_tokens=40)
    for _, _, ra, rb in iter_aligned(a, b):
        torch.testing.assert_close(ra, rb, rtol=1e-5, atol=1e-5)
    assert tiny_llm.engine.block_manager.num_free_blocks == 64


# -- KL divergence ----------------------------------------------------------------------------


def test_kl_of_a_model_against_itself_is_zero(tiny_llm):
    r = kl_divergence(tiny_llm, tiny_llm, _words(300), ctx=64)
    assert (r.kl_mean, r.kl_median, r.kl_p99, r.kl_max) == (0.0, 0.0, 0.0, 0.0)
    assert r.same_top_rate == 1.0
    assert r.ppl == r.ppl_base
    assert r.num_tokens == 4 * 63


def test_kl_against_another_seed_equals_an_independent_torch_computation(
        tiny_llm, hf_model, tiny_model_factory):
    from transformers import AutoModelForCausalLM

    other_path = tiny_model_factory("llama", seed=1, logit_scale=20.0)
    other_hf = AutoModelForCausalLM.from_pretrained(other_path, dtype=torch.float32).eval()
    text, ctx = _words(300, seed=3), 64
    kls, same, nll, nll_base = [], 0, 0.0, 0.0
    for w in _hf_windows(tiny_llm.tokenizer, text, ctx):
        lq, lb = _hf_logprobs(hf_model, w)[:-1], _hf_logprobs(other_hf, w)[:-1]
        kls.append((lb.exp() * (lb - lq)).sum(-1))
        same += int((lq.argmax(-1) == lb.argmax(-1)).sum())
        target = torch.tensor(w[1:])[:, None]
        nll -= float(lq.gather(1, target).sum())
        nll_base -= float(lb.gather(1, target).sum())
    kl = torch.cat(kls).numpy()
    r = kl_divergence(tiny_llm, _llm(other_path), text, ctx=ctx)
    assert r.num_tokens == len(kl)
    assert r.kl_mean > 0.1  # the two models really differ
    assert r.kl_mean == pytest.approx(kl.mean(), rel=1e-4)
    assert r.kl_median == pytest.approx(np.median(kl), rel=1e-4)
    assert r.kl_p99 == pytest.approx(np.percentile(kl, 99), rel=1e-4)
    assert r.kl_max == pytest.approx(kl.max(), rel=1e-4)
    assert r.same_top_rate == same / len(kl)
    assert r.ppl == pytest.approx(math.exp(nll / len(kl)), rel=1e-4)
    assert r.ppl_base == pytest.approx(math.exp(nll_base / len(kl)), rel=1e-4)


# -- tasks ------------------------------------------------------------------------------------
# Synthetic items in each format, over the tiny word-level vocabulary (unknown words such as
# "Question" become token 0). Each builder returns the file and, per item, the (context,
# continuation) texts the task must score, the gold index and the acc_norm lengths.


def _arc(tmp_path, rng):
    rows, items = [], []
    for i in range(8):
        q, choices = _words(5, rng.random()), [_words(rng.randrange(1, 4), rng.random())
                                                for _ in range(4)]
        labels = ["A", "B", "C", "D"] if i % 2 else ["1", "2", "3", "4"]
        rows.append({"id": str(i), "question": q, "answerKey": labels[i % 4],
                     "choices": {"text": choices, "label": labels}})
        items.append(([(f"Question: {q}\nAnswer:", " " + c) for c in choices], i % 4,
                      [len(c) for c in choices]))
    return _jsonl(tmp_path / "ARC-Easy-test.jsonl", rows), items


def _piqa(tmp_path, rng):
    rows, items, labels = [], [], []
    for i in range(8):
        goal, sols = _words(4, rng.random()), [_words(rng.randrange(1, 5), rng.random())
                                               for _ in range(2)]
        rows.append({"goal": goal, "sol1": sols[0], "sol2": sols[1]})
        labels.append(i % 2)
        items.append(([(f"Question: {goal}\nAnswer:", " " + s) for s in sols], i % 2,
                      [len(s) for s in sols]))
    (tmp_path / "valid-labels.lst").write_text("".join(f"{x}\n" for x in labels))
    return _jsonl(tmp_path / "valid.jsonl", rows), items


def _hellaswag(tmp_path, rng):
    lines, items = [], []
    for i in range(8):
        ctx, endings = _words(6, rng.random()), [_words(rng.randrange(1, 4), rng.random())
                                                 for _ in range(4)]
        lines += [f"Label: {ctx}", str(i % 4), *endings]
        items.append(([(f"Label: {ctx}", " " + e) for e in endings], i % 4,
                      [len(e) for e in endings]))
    path = tmp_path / "hellaswag_val.txt.bz2"
    with bz2.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return path, items


def _boolq(tmp_path, rng):
    rows, items = [], []
    for i in range(8):
        passage, question = _words(8, rng.random()), _words(3, rng.random())
        rows.append({"query": f"Passage: {passage}\nQuestion: {question}?",
                     "choices": ["w10", "w11"], "gold": i % 2})
        items.append(([(f"{passage}\nQuestion: {question}?\nAnswer:", " w10"),
                       (f"{passage}\nQuestion: {question}?\nAnswer:", " w11")], i % 2, None))
    return _jsonl(tmp_path / "boolq_dev_mosaicml.jsonl", rows), items


def _winogrande(tmp_path, rng):
    rows, items = [], []
    for i in range(8):
        options, cont = [_words(5, rng.random()) for _ in range(2)], _words(3, rng.random())
        rows.append({"context_options": options, "continuation": cont, "gold": i % 2})
        items.append(([(o, " " + cont) for o in options], i % 2, None))
    return _jsonl(tmp_path / "winogrande_dev_mosaicml.jsonl", rows), items


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _hf_pair_scores(hf_model, tokenizer, pairs):
    """(sum of continuation log-probs, every continuation token greedy) per pair."""
    out = []
    for context, continuation in pairs:
        ctx = tokenizer.encode(context, add_special_tokens=False)
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        lp = _hf_logprobs(hf_model, ctx + cont)[len(ctx) - 1:-1]
        target = torch.tensor(cont)
        out.append((float(lp.gather(1, target[:, None]).sum()),
                    bool((lp.argmax(-1) == target).all())))
    return out


@pytest.mark.parametrize("build", [_arc, _piqa, _hellaswag, _boolq, _winogrande])
def test_multiple_choice_accuracy_equals_a_hand_computation(tiny_llm, hf_model, tmp_path,
                                                            build):
    path, items = build(tmp_path, random.Random(build.__name__))
    correct, correct_norm = [], []
    for pairs, gold, lengths in items:
        lls = np.array([s for s, _ in _hf_pair_scores(hf_model, tiny_llm.tokenizer, pairs)])
        correct.append(int(np.argmax(lls)) == gold)
        if lengths is not None:
            correct_norm.append(int(np.argmax(lls / np.array(lengths))) == gold)
    [r] = evaluate_tasks(tiny_llm, [str(path)])
    assert r.num_items == len(items)
    assert r.correct == correct
    assert r.acc == sum(correct) / len(items)
    if correct_norm:
        assert r.correct_norm == correct_norm
        assert r.acc_norm == sum(correct_norm) / len(items)
    else:
        assert r.acc_norm is None
    assert evaluate_tasks(tiny_llm, [str(path)], limit=3)[0].correct == correct[:3]


def test_lambada_accuracy_is_an_exact_greedy_match_of_the_last_word(tiny_llm, hf_model,
                                                                    tmp_path):
    rng, rows, expected = random.Random(5), [], []
    while len(rows) < 6:
        context = _words(10, rng.random())
        top = int(_hf_logprobs(hf_model, tiny_llm.tokenizer.encode(context))[-1].argmax())
        if top < 2:
            continue  # "<s>" / "</s>" are not words of the text
        hit = len(rows) % 2 == 0
        rows.append({"text": f"{context} w{top if hit else (top + 7 - 2) % 254 + 2}"})
        expected.append(hit)
    path = _jsonl(tmp_path / "lambada_test.jsonl", rows)
    [r] = evaluate_tasks(tiny_llm, [str(path)])
    assert r.name == "lambada_openai"
    assert r.correct == expected and r.acc == 0.5 and r.acc_norm is None


def test_task_file_of_unknown_format_raises_naming_the_file(tiny_llm, tmp_path):
    path = _jsonl(tmp_path / "mystery.jsonl", [{"prompt": "w3", "answer": "w4"}])
    with pytest.raises(ValueError, match="mystery.jsonl: unknown task format"):
        evaluate_tasks(tiny_llm, [str(path)])


def test_piqa_without_its_labels_file_raises_naming_it(tiny_llm, tmp_path):
    path = _jsonl(tmp_path / "valid.jsonl", [{"goal": "w2", "sol1": "w3", "sol2": "w4"}])
    with pytest.raises(FileNotFoundError, match="valid-labels.lst"):
        evaluate_tasks(tiny_llm, [str(path)])


# -- data -------------------------------------------------------------------------------------


def test_wikitext2_gptq_join_turns_blank_lines_into_empty_rows():
    raw = " \n = Title = \n \n Body text .\n"
    # rows "", " = Title = \n", "", " Body text .\n" joined by "\n\n"
    assert wikitext2_gptq_text(raw) == "\n\n = Title = \n\n\n\n\n Body text .\n"


def test_wikitext2_loads_with_the_gptq_sha256():
    try:
        text = load_wikitext2()
    except FileNotFoundError:
        pytest.skip("../shared/data/wikitext-2-raw/wiki.test.raw is not beside the checkout")
    assert len(text.encode("utf-8")) == 1_296_370
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n")


def test_wikitext2_with_other_bytes_fails_its_sha256_check(tmp_path):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(" = Not WikiText = \n")
    with pytest.raises(ValueError, match="sha256"):
        load_wikitext2(tmp_path)


def test_missing_data_file_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "wikitext-2-raw")):
        load_wikitext2(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        load_text(str(tmp_path / "nowhere.txt"))


def test_jsonl_text_rows_are_joined_by_blank_lines(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "w2 w3"}, {"text": "w4"}])
    assert load_text(str(path)) == "w2 w3\n\nw4"


# -- CLI --------------------------------------------------------------------------------------


def _cli(argv):
    from twinfer import cli_eval

    parser = argparse.ArgumentParser()
    cli_eval.register(parser.add_subparsers(dest="command"))
    return cli_eval.run(parser.parse_args(argv))


def test_cli_eval_ppl_prints_and_writes_the_api_result(tiny_path, tiny_llm, tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"text": _words(100)}, {"text": _words(100, 1)}])
    out = tmp_path / "ppl.json"
    assert _cli(["eval", "ppl", str(tiny_path), "--engine", "torch", "--dtype", "float32",
                 "--data", str(data), "--ctx", "32", "--max-windows", "3", "--json", str(out),
                 "--no-progress"]) == 0
    result = json.loads(out.read_text())
    expected = perplexity(tiny_llm, load_text(str(data)), ctx=32, max_windows=3)
    assert result["ppl"] == pytest.approx(expected.ppl, rel=1e-6)
    assert result["num_windows"] == 3
    assert f"{expected.ppl:.4f}" in capsys.readouterr().out


def test_cli_eval_with_a_missing_data_file_exits_2_naming_it(tiny_path, tmp_path, capsys):
    missing = tmp_path / "absent.txt"
    assert _cli(["eval", "ppl", str(tiny_path), "--data", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


# -- the real model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_window_perplexity_matches_the_engines_prompt_logprobs(smollm2_llm):
    try:
        text = load_wikitext2()
    except FileNotFoundError:
        pytest.skip("../shared/data/wikitext-2-raw/wiki.test.raw is not beside the checkout")
    ctx = 64
    r = perplexity(smollm2_llm, text[:4000], ctx=ctx, max_windows=1)
    window = smollm2_llm.tokenizer.encode(text[:4000])[:ctx]
    [out] = smollm2_llm.generate([window], SamplingParams(max_tokens=1, prompt_logprobs=0))
    nll = -sum(lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], window[1:]))
    assert r.nll_mean == pytest.approx(nll / (ctx - 1), rel=1e-5)
    assert 3 < r.ppl < 100  # a real model on real text
