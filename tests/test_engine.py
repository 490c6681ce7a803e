"""End-to-end behaviour of LLMEngine on tiny models: preemption, prefix caching, seeds."""

from __future__ import annotations

import random

from conftest import GREEDY, rand_tokens

from twinfer import LLM, SamplingParams


def test_preempted_batch_matches_each_request_alone(peaked_model, engine):
    rng = random.Random(0)
    requests = [(rand_tokens(rng, rng.randint(1, 60)), rng.randint(1, 40)) for _ in range(64)]
    # float32 everywhere (also on CUDA, where "auto" is fp16): the near-tie bound is fp32's.
    small = LLM(peaked_model, engine=engine, num_kv_blocks=16, max_model_len=128,
                max_num_seqs=64, enable_prefix_caching=False, dtype="float32")
    batched = small.generate([p for p, _ in requests],
                             [SamplingParams(max_tokens=n, **GREEDY) for _, n in requests])
    assert small.engine.scheduler.num_preemptions > 0, "cache was not small enough to preempt"
    bm = small.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks

    # The oracle is engine_torch, one request at a time (for engine="fast" this also checks
    # fast-under-preemption against the reference, and keeps the interpreter's share small).
    alone_llm = LLM(peaked_model, engine="torch", num_kv_blocks=64, max_model_len=128,
                    enable_prefix_caching=False, dtype="float32")
    for (prompt, n), out in zip(requests, batched):
        params = SamplingParams(max_tokens=n, logprobs=2, **GREEDY)
        alone = alone_llm.generate([prompt], params)[0].outputs[0]
        got = out.outputs[0].token_ids
        assert len(got) == n
        if got != alone.token_ids:  # allowed only at a near-tie
            k = next(i for i, (a, b) in enumerate(zip(got, alone.token_ids)) if a != b)
            top2 = sorted((lp.logprob for lp in alone.logprobs[k].values()), reverse=True)[:2]
            assert top2[0] - top2[1] < 1e-4, f"diverged at token {k} without a near-tie"


def test_prefix_cache_prefills_only_new_tokens(tiny_model_factory, engine):
    path = tiny_model_factory("llama")
    rng = random.Random(1)
    prefix = rand_tokens(rng, 1000)
    first, second = prefix + rand_tokens(rng, 7), prefix + rand_tokens(rng, 24)
    params = SamplingParams(max_tokens=5, **GREEDY)

    llm = LLM(path, engine=engine, num_kv_blocks=200, max_model_len=1100)
    llm.generate([first], params)
    before = llm.engine.stats.num_scheduled_tokens
    out = llm.generate([second], params)[0]
    prefilled = llm.engine.stats.num_scheduled_tokens - before - (params.max_tokens - 1)
    assert out.num_cached_tokens == 992  # 62 full blocks of 16 shared with the first prompt
    assert prefilled == len(second) - 992

    uncached = LLM(path, engine=engine, num_kv_blocks=200, max_model_len=1100,
                   enable_prefix_caching=False).generate([second], params)[0]
    assert uncached.num_cached_tokens == 0
    assert out.outputs[0].token_ids == uncached.outputs[0].token_ids


def test_seeded_request_is_the_same_alone_and_in_a_batch(tiny_model_factory, engine):
    llm = LLM(tiny_model_factory("llama"), engine=engine, num_kv_blocks=256,
              max_model_len=256)
    rng = random.Random(2)
    prompt = rand_tokens(rng, 12)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=24,
                            ignore_eos=True)
    alone = llm.generate([prompt], seeded)[0].outputs[0].token_ids
    others = [rand_tokens(rng, rng.randint(1, 30)) for _ in range(16)]
    other_params = [SamplingParams(temperature=1.0, seed=i if i % 2 else None,
                                   max_tokens=rng.randint(1, 30), ignore_eos=True)
                    for i in range(16)]
    outs = llm.generate(others[:8] + [prompt] + others[8:],
                        other_params[:8] + [seeded] + other_params[8:])
    assert outs[8].outputs[0].token_ids == alone


def test_different_seeds_give_different_samples(tiny_model_factory, engine):
    llm = LLM(tiny_model_factory("llama"), engine=engine, num_kv_blocks=64, max_model_len=256)
    outs = llm.generate([[5, 6, 7]] * 2, [SamplingParams(temperature=1.0, seed=s, max_tokens=16,
                                                         ignore_eos=True) for s in (1, 2)])
    assert outs[0].outputs[0].token_ids != outs[1].outputs[0].token_ids


def test_chunked_prefill_mixes_long_prompt_with_decodes(tiny_model_factory, engine):
    path = tiny_model_factory("llama")
    llm = LLM(path, engine=engine, num_kv_blocks=128, max_model_len=1024,
              max_num_batched_tokens=64)
    rng = random.Random(3)
    short, long = rand_tokens(rng, 5), rand_tokens(rng, 500)
    eng = llm.engine
    eng.add_request("short", short, SamplingParams(max_tokens=20, **GREEDY))
    eng.step()  # short prefilled, now decoding
    eng.add_request("long", long, SamplingParams(max_tokens=2, **GREEDY))
    batch = eng.scheduler.schedule()
    assert [s.request_id for s in batch.seqs] == ["short", "long"]
    assert batch.query_lens == [1, 63]  # the decode plus a 63-token chunk of the long prompt


def test_streaming_yields_growing_text_and_ends_finished(tiny_model_factory, engine):
    llm = LLM(tiny_model_factory("llama"), engine=engine, num_kv_blocks=64, max_model_len=256)
    outs = list(llm.stream([3, 4, 5], SamplingParams(max_tokens=6, **GREEDY)))
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 2, 3, 4, 5, 6]
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert all(not o.finished for o in outs[:-1])
    final = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=6, **GREEDY))[0]
    assert outs[-1].outputs[0].text == final.outputs[0].text


def test_abort_frees_blocks_of_a_running_request(tiny_model_factory, engine):
    llm = LLM(tiny_model_factory("llama"), engine=engine, num_kv_blocks=64, max_model_len=256)
    eng = llm.engine
    eng.add_request("a", list(range(2, 50)), SamplingParams(max_tokens=100, **GREEDY))
    eng.step()
    assert eng.block_manager.num_used_blocks > 0
    assert eng.abort_request("a")
    assert eng.block_manager.num_used_blocks == 0
    assert not eng.has_unfinished_requests()


def test_generate_reports_text_prompts_and_encodes_them_once(tiny_model_factory, monkeypatch):
    llm = LLM(tiny_model_factory("llama"), engine="torch", num_kv_blocks=64, max_model_len=256)
    calls = []
    encode = llm.tokenizer.encode
    monkeypatch.setattr(llm.tokenizer, "encode", lambda text: calls.append(text) or encode(text))
    outs = llm.generate(["w5 w6 w7", [5, 6, 7]], SamplingParams(max_tokens=2, **GREEDY))
    assert [o.prompt for o in outs] == ["w5 w6 w7", None]
    assert outs[0].prompt_token_ids == [5, 6, 7] == outs[1].prompt_token_ids
    assert calls == ["w5 w6 w7"]
