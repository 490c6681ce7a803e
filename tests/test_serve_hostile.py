"""Hundreds of malformed or hostile requests: every one gets a 4xx with a useful message, the
server stays healthy, a legitimate request in flight completes, and no KV block leaks."""

from __future__ import annotations

import threading

import httpx
import pytest
from serving import running_server

from twinfer import LLM

MODEL = "tiny"
COMPLETION = {"model": MODEL, "prompt": "w5 w6", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 4}

BAD_SAMPLING_VALUES = {
    "max_tokens": [-1, "10", 1.5, True, 10 ** 9, 10 ** 30, [], {}],
    "temperature": [-1, 3, "hot", [], {}, True, None],
    "top_p": [0, -0.1, 1.1, "x", None],
    "top_k": [-5, 1.5, "a", None],
    "min_p": [-1, 2, "x"],
    "n": [0, -1, 1000, "2", 1.5, None],
    "stop": [123, [1, 2], ["a"] * 10_000, "", [""], ["x" * 10_000], {"a": 1}, [None]],
    "seed": ["x", 1.5, 2 ** 70, [1]],
    "presence_penalty": [5, -5, "x"],
    "frequency_penalty": [5, -5, "x"],
    "repetition_penalty": [0, -1, 100, "x"],
    "stop_token_ids": [[-1], "x", [1.5], ["a"], [1] * 1000],
    "ignore_eos": ["x", 1],
    "stream": ["yes", 2],
    "stream_options": [1, {"include_usage": "yes"}, {"foo": 1}, []],
    "logit_bias": [{"1": 5.0}, [1], "x"],
    "user": [123, "x" * 1000],
    "model": [123, [], {}, "no-such-model"],
    "an_unknown_field": [1, "x", None],
    "skip_special_tokens": ["no"],
}
BAD_COMPLETION_VALUES = {
    "prompt": [None, 123, 1.5, True, {}, [], [[]], [1, "a"], [[1], "x"], [-1], [10 ** 9],
               [256], "", [""], [None], ["w5"] * 1000, [[1, 2], []]],
    "logprobs": [-1, 21, 1000, "x", True],
    "echo": ["yes", 1],
    "best_of": [5, 0, "x"],
    "suffix": ["x", 1],
}
BAD_CHAT_VALUES = {
    "messages": [None, [], "hi", [{}], [{"role": "bad", "content": "x"}], [{"content": "x"}],
                 [{"role": "user", "content": 123}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                 [{"role": "user", "content": "x", "extra": 1}], [None], [[]]],
    "max_completion_tokens": [0, -1, 10 ** 9, "x"],
    "logprobs": ["x", 1],
    "top_logprobs": [-1, 50, "x"],
    "tools": [[{"type": "function", "function": {"name": "f"}}]],
    "response_format": [{"type": "json_object"}],
}
RAW_BODIES = [b"{", b"", b"null", b"[]", b"123", b'"str"', b"\xff\xfe\x00", b"[" * 100_000,
              b'{"prompt": NaN}', b'{"prompt": "x", "temperature": NaN}',
              b'{"prompt": "x", "max_tokens": Infinity}', b'{"prompt": "x"} trailing',
              b'{"prompt": "\xc3\x28"}', b'{"a":' * 5000, b"{" + b'"k": 1,' * 100_000 + b"}"]


def hostile_requests() -> list[tuple[str, str, dict | bytes]]:
    reqs = []
    for base_path, base in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        extra = BAD_COMPLETION_VALUES if base is COMPLETION else BAD_CHAT_VALUES
        for field, values in {**BAD_SAMPLING_VALUES, **extra}.items():
            for v in values:
                reqs.append(("POST", base_path, {**base, field: v}))
        reqs.append(("POST", base_path, {k: v for k, v in base.items() if k == "model"}))
        for raw in RAW_BODIES:
            reqs.append(("POST", base_path, raw))
        reqs.append(("GET", base_path, b""))
    reqs += [("POST", "/tokenize", {}), ("POST", "/tokenize", {"prompt": 1}),
             ("POST", "/tokenize", {"prompt": "x", "messages": []}),
             ("POST", "/detokenize", {"tokens": [-1]}), ("POST", "/detokenize",
                                                          {"tokens": [10 ** 9]}),
             ("POST", "/detokenize", {"tokens": "x"}), ("GET", "/no/such/path", b""),
             ("POST", "/v1/models", b"{}")]
    return reqs


@pytest.fixture(scope="module")
def server(tiny_model_factory):
    llm = LLM(tiny_model_factory("llama"), engine="torch", num_kv_blocks=64, max_model_len=256)
    with running_server(llm.engine, MODEL, max_body_bytes=1 << 20) as (url, app):
        yield url, app.state.twinfer.engine.engine


def test_there_are_at_least_200_hostile_requests():
    assert len(hostile_requests()) >= 200


def test_every_hostile_request_gets_a_4xx_with_a_message(server):
    url, engine = server
    legit: dict = {}

    def run_legit():
        body = {**COMPLETION, "max_tokens": 60, "ignore_eos": True, "temperature": 0}
        legit["response"] = httpx.post(url + "/v1/completions", json=body, timeout=120)

    thread = threading.Thread(target=run_legit)
    thread.start()
    failures = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for method, path, body in hostile_requests():
            if isinstance(body, dict):
                r = c.request(method, path, json=body)
            else:
                r = c.request(method, path, content=body,
                              headers={"content-type": "application/json"})
            msg = r.json().get("error", {}).get("message") if r.headers.get(
                "content-type", "").startswith("application/json") else None
            if not (400 <= r.status_code < 500 and msg):
                failures.append((path, str(body)[:80], r.status_code, r.text[:200]))
        huge = b'{"model": "tiny", "prompt": "' + b"a" * (20 << 20) + b'"}'
        r = c.post("/v1/completions", content=huge, headers={"content-type": "application/json"})
        assert r.status_code == 413
    thread.join()
    assert not failures, failures[:10]
    assert legit["response"].status_code == 200
    assert legit["response"].json()["usage"]["completion_tokens"] == 60
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert engine.block_manager.num_used_blocks == 0
    metrics = httpx.get(url + "/metrics").text
    assert 'twinfer_kv_cache_blocks_used{model_name="tiny"} 0.0' in metrics


def test_valid_chat_still_works_after_the_barrage(server):
    r = httpx.post(server[0] + "/v1/chat/completions", json=CHAT, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
