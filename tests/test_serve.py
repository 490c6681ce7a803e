"""The OpenAI-compatible server over a real uvicorn on 127.0.0.1, driven by the official
``openai`` client (and raw httpx for what a well-behaved client would never send)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from serving import running_server

from twinfer import LLM, SamplingParams

MODEL = "smollm2"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(smollm2_path):
    llm = LLM(str(smollm2_path), engine="torch", dtype="float32", max_model_len=1024,
              max_num_seqs=64, cpu_kv_cache_bytes=1 << 30)
    with running_server(llm.engine, MODEL, max_waiting=256) as (url, app):
        yield url, app.state.twinfer


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def kv_blocks_in_use(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("twinfer_kv_cache_blocks_used"))
    return float(line.rsplit(" ", 1)[1])


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_greedy_completion_equals_llm_generate(client, smollm2_llm):
    prompt = "The three primary colors are"
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    want = smollm2_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24))[0]
    assert resp.choices[0].text == want.outputs[0].text
    assert resp.choices[0].finish_reason == want.finish_reason
    assert resp.usage.prompt_tokens == len(want.prompt_token_ids)
    assert resp.usage.completion_tokens == len(want.outputs[0].token_ids)


def test_chat_completion_answers_paris(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_completion_tokens=24, temperature=0)
    assert "Paris" in resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"


def test_streamed_chat_equals_non_streamed(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name three fruits."}],
                  max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].choices == []


def test_async_client_streams_completions_and_chat(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0)
        stream = await client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=8,
                                                 temperature=0, stream=True)
        parts = [c.choices[0].text async for c in stream]
        full = await client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=8,
                                               temperature=0)
        messages = [{"role": "user", "content": "Count to five."}]
        chat_stream = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True)
        chat_parts = [c.choices[0].delta.content or "" async for c in chat_stream]
        chat = await client.chat.completions.create(model=MODEL, messages=messages,
                                                    max_tokens=12, temperature=0)
        return ("".join(parts), full.choices[0].text,
                "".join(chat_parts), chat.choices[0].message.content)

    streamed, full, chat_streamed, chat_full = asyncio.run(run())
    assert streamed == full
    assert chat_streamed == chat_full


def test_64_concurrent_streams_are_well_formed_and_match_greedy(server, smollm2_llm):
    url = server[0]
    prompts = [f"Write a sentence about the number {i}." for i in range(64)]
    want = smollm2_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16))

    async def one(client: httpx.AsyncClient, prompt: str) -> tuple[str, dict, list[str]]:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        events, text, usage = [], "", None
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line:
                    events.append(line)
        assert all(e.startswith("data: ") for e in events)
        assert events[-1] == "data: [DONE]"
        import json
        for e in events[:-1]:
            chunk = json.loads(e[6:])
            if chunk["choices"]:
                text += chunk["choices"][0]["text"]
            else:
                usage = chunk["usage"]
        return text, usage, events

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(run())
    for (text, usage, _), w in zip(results, want):
        assert text == w.outputs[0].text
        assert usage == {"prompt_tokens": len(w.prompt_token_ids),
                         "completion_tokens": len(w.outputs[0].token_ids),
                         "total_tokens": len(w.prompt_token_ids) + len(w.outputs[0].token_ids)}
    assert kv_blocks_in_use(url) == 0


def test_echo_logprobs_with_max_tokens_0_give_prompt_logprobs(client, smollm2_llm):
    """What lm-evaluation-harness' local-completions loglikelihood requests rely on."""
    prompt = "The capital of France is Paris"
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True,
                                     logprobs=1, temperature=0)
    choice = resp.choices[0]
    assert choice.text == prompt
    want = smollm2_llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
    ids = want.prompt_token_ids
    assert len(choice.logprobs.token_logprobs) == len(ids)
    assert choice.logprobs.token_logprobs[0] is None
    for got, entry, tid in zip(choice.logprobs.token_logprobs[1:], want.prompt_logprobs[1:],
                               ids[1:]):
        assert abs(got - entry[tid].logprob) < 1e-4
    assert "".join(choice.logprobs.tokens) == prompt
    assert resp.usage.completion_tokens == 0


def test_n_choices_with_a_seed_are_reproducible(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, n=3, seed=7,
                  temperature=1.0)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1


def test_chat_logprobs_have_top_alternatives(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=3)
    items = resp.choices[0].logprobs.content
    assert len(items) == resp.usage.completion_tokens
    assert all(len(i.top_logprobs) == 3 and i.logprob <= 0 for i in items)
    assert items[0].logprob == max(t.logprob for t in items[0].top_logprobs)


def test_prompt_over_context_length_is_a_400_naming_the_prompt(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="hello " * 2000, max_tokens=4)


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)


def test_tokenize_and_detokenize_round_trip(server):
    url = server[0]
    toks = httpx.post(url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert toks["count"] == len(toks["tokens"]) > 0
    text = httpx.post(url + "/detokenize", json={"tokens": toks["tokens"]}).json()["prompt"]
    assert text == "Hello world"


def test_disconnected_stream_is_aborted_and_frees_its_blocks(server):
    url, state = server
    engine = state.engine.engine
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 800,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", url + "/v1/completions",
                                                 json=body) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        assert engine.block_manager.num_used_blocks > 0
        steps_at_disconnect = engine.stats.num_steps
    deadline = time.time() + 10
    while engine.block_manager.num_used_blocks and time.time() < deadline:
        time.sleep(0.01)
    assert engine.block_manager.num_used_blocks == 0
    assert not engine.has_unfinished_requests()
    # The abort is applied before the next step: only the step already running when the
    # disconnect arrived may finish (one more allowed for the test's own polling slack).
    assert engine.stats.num_steps - steps_at_disconnect <= 2
    assert kv_blocks_in_use(url) == 0


def test_disconnected_non_streaming_request_is_aborted_and_frees_its_blocks(server):
    url, state = server
    engine = state.engine.engine
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 800,
            "ignore_eos": True}
    generated_before = engine.stats.num_generated_tokens
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(url + "/v1/completions", json=body, timeout=1.5)
    deadline = time.time() + 10
    while engine.block_manager.num_used_blocks and time.time() < deadline:
        time.sleep(0.01)
    assert engine.block_manager.num_used_blocks == 0
    assert not engine.has_unfinished_requests()
    # Noticed within one poll interval (0.25 s): far fewer than the 800 tokens it asked for.
    assert 0 < engine.stats.num_generated_tokens - generated_before < 400
    assert kv_blocks_in_use(url) == 0


def test_api_key_is_required_when_set(smollm2_llm):
    with running_server(smollm2_llm.engine, MODEL, api_key="s3cret") as (url, _):
        assert httpx.get(url + "/health").status_code == 200
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices


def test_full_waiting_queue_answers_503(smollm2_path):
    llm = LLM(str(smollm2_path), engine="torch", max_model_len=512, max_num_seqs=1,
              cpu_kv_cache_bytes=256 << 20)
    with running_server(llm.engine, MODEL, max_waiting=1) as (url, _):
        async def run():
            async with httpx.AsyncClient(timeout=120) as c:
                body = {"model": MODEL, "prompt": "Count:", "max_tokens": 30, "ignore_eos": True}
                return await asyncio.gather(*(c.post(url + "/v1/completions", json=body)
                                              for _ in range(6)))

        codes = sorted(r.status_code for r in asyncio.run(run()))
        # At most one running (max_num_seqs=1) and one waiting: the other four are refused.
        assert 1 <= codes.count(200) <= 2 and codes.count(503) >= 4
        assert set(codes) <= {200, 503}
