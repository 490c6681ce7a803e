"""bench serve / bench offline: the latency arithmetic by hand, and both commands end to end on
a tiny random model (the load generator against a real uvicorn server on 127.0.0.1)."""

from __future__ import annotations

import json
import random

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving import running_server

from bench.cli import main as bench_main
from bench.latency_stats import RequestTiming, percentile, summarize
from bench.serve_load import default_token_range, parse_num_prompts, parse_sse_line
from bench.serve_prompts import PromptSource
from twinfer import LLM

MODEL = "tiny"


# -- arithmetic -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy_linear_interpolation(n):
    rng = random.Random(n)
    values = [rng.expovariate(3.0) for _ in range(n)]
    for q in (0, 1, 25, 37.5, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12)


def test_percentile_of_no_values_is_an_error():
    with pytest.raises(ValueError):
        percentile([], 50)


def test_ttft_tpot_and_itl_come_from_the_stream_timestamps():
    # Sent at 10.0; token-bearing chunks at 10.5, 10.7, 11.0, 11.5 (the last one holds two
    # tokens); stream closed at 11.6; the server's usage says 5 completion tokens.
    t = RequestTiming(start=10.0, chunk_times=[10.5, 10.7, 11.0, 11.5], end=11.6,
                      completion_tokens=5, success=True)
    assert t.ttft == pytest.approx(0.5)
    assert t.e2e == pytest.approx(1.6)
    assert t.tpot == pytest.approx((1.6 - 0.5) / 4)
    assert t.itls == pytest.approx([0.2, 0.3, 0.5])


def test_tpot_is_undefined_for_a_single_output_token():
    t = RequestTiming(start=0.0, chunk_times=[0.3], end=0.4, completion_tokens=1, success=True)
    assert t.tpot is None and t.itls == []


def test_summary_throughput_counts_successful_requests_only():
    ok1 = RequestTiming(0.0, [1.0, 2.0], 2.0, prompt_tokens=10, completion_tokens=3,
                        success=True, usage_reported=True)
    ok2 = RequestTiming(1.0, [1.5, 2.0, 3.0], 4.0, prompt_tokens=20, completion_tokens=5,
                        success=True, usage_reported=True)
    failed = RequestTiming(0.5, [0.9], 1.0, prompt_tokens=99, completion_tokens=99,
                           error="HTTP 500")
    s = summarize([ok1, ok2, failed], duration=4.0)
    assert (s.num_completed, s.num_failed, s.num_without_usage) == (2, 1, 0)
    assert (s.total_input_tokens, s.total_output_tokens) == (30, 8)
    assert s.request_throughput == pytest.approx(0.5)
    assert s.output_throughput == pytest.approx(2.0)
    assert s.total_token_throughput == pytest.approx(9.5)
    assert s.ttft.mean == pytest.approx(0.75) and s.ttft.count == 2  # 1.0 and 0.5
    assert s.e2e.p50 == pytest.approx(2.5)  # 2.0 and 3.0
    assert s.tpot.mean == pytest.approx(((2.0 - 1.0) / 2 + (3.0 - 0.5) / 4) / 2)


def test_summary_pools_inter_token_gaps_of_all_requests():
    a = RequestTiming(0.0, [1.0, 1.1, 1.4], 1.4, completion_tokens=3, success=True)
    b = RequestTiming(0.0, [2.0, 3.0], 3.0, completion_tokens=2, success=True)
    s = summarize([a, b], duration=3.0)
    assert s.itl.count == 3  # 0.1, 0.3, 1.0
    assert s.itl.mean == pytest.approx(1.4 / 3)
    assert s.itl.p50 == pytest.approx(0.3)
    assert s.itl.p90 == pytest.approx(0.3 + 0.8 * 0.7)


# -- stream parsing and prompts ---------------------------------------------------------------


def test_sse_lines_give_text_usage_errors_and_done():
    chunk = 'data: {"choices": [{"index": 0, "text": " hi", "finish_reason": null}]}'
    assert parse_sse_line(chunk, "completions").text == " hi"
    chat = 'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}'
    assert parse_sse_line(chat, "chat").text == ""
    usage = parse_sse_line('data: {"choices": [], "usage": {"completion_tokens": 4}}', "chat")
    assert usage.text == "" and usage.usage == {"completion_tokens": 4}
    assert parse_sse_line('data: {"error": {"message": "boom"}}', "chat").error == "boom"
    assert parse_sse_line("data: [DONE]", "chat").done
    assert parse_sse_line("", "chat") is None and parse_sse_line(": ping", "chat") is None


def test_random_token_prompts_have_exact_lengths_and_never_repeat():
    source = PromptSource("random", 16, seed=0, use_token_ids=True, token_range=(2, 256))
    first, second = source.take(4), source.take(4)
    assert all(p.num_tokens == 16 and len(p.prompt) == 16 for p in first + second)
    assert all(2 <= t < 256 for p in first for t in p.prompt)
    assert len({tuple(p.prompt) for p in first + second}) == 8


def test_num_prompts_is_one_count_for_all_levels_or_one_per_level():
    assert parse_num_prompts(None, [1, 100]) == [16, 400]
    assert parse_num_prompts("8", [1, 100]) == [8, 8]
    assert parse_num_prompts("4,100", [1, 100]) == [4, 100]
    with pytest.raises(ValueError, match="one per concurrency level"):
        parse_num_prompts("4,100,7", [1, 100])


def test_random_token_ids_stay_inside_a_small_vocabulary():
    assert default_token_range(None) == (100, 10000)
    assert default_token_range(128256) == (100, 10000)
    assert default_token_range(4000) == (100, 4000)
    assert default_token_range(256) == (2, 256)


def test_sharegpt_prompts_are_first_human_turns(tmp_path):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "hello"},
                                      {"from": "gpt", "value": "hi"}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "only a reply"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "bye"}]}]))
    prompts = PromptSource(f"sharegpt:{path}", 8, seed=0, use_token_ids=False).take(4)
    assert sorted(p.prompt for p in prompts[:2]) == ["bye", "hello"]
    assert [p.prompt for p in prompts[2:]] == [p.prompt for p in prompts[:2]]  # wraps around


# -- end to end -------------------------------------------------------------------------------


def _counters(url: str) -> dict[str, float]:
    values = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name.endswith("_total"):
                status = sample.labels.get("status")
                values[sample.name + (f"/{status}" if status else "")] = sample.value
    return values


def test_serve_benchmark_token_counts_agree_with_server_metrics(tiny_model_factory, tmp_path):
    llm = LLM(str(tiny_model_factory("llama")), engine="torch", max_model_len=128,
              max_num_seqs=8, num_kv_blocks=64)
    with running_server(llm.engine, MODEL) as (url, _):
        before = _counters(url)
        rc = bench_main(["bench", "serve", "--base-url", url + "/v1", "--model", MODEL,
                         "--concurrency", "1,4", "--num-prompts", "8", "--input-len", "16",
                         "--output-len", "8", "--num-warmups", "0",
                         "-o", str(tmp_path)])
        after = _counters(url)
    assert rc == 0
    (path,) = tmp_path.glob("serve-tiny-*.json")
    results = json.loads(path.read_text())["results"]
    assert [r["concurrency"] for r in results] == [1, 4]
    for r in results:
        assert (r["num_completed"], r["num_failed"], r["num_without_usage"]) == (8, 0, 0)
        assert (r["total_input_tokens"], r["total_output_tokens"]) == (8 * 16, 8 * 8)
        assert r["num_output_len_mismatch"] == 0
        assert 0 < r["ttft"]["p50"] <= r["e2e"]["p50"] and r["tpot"]["count"] == 8

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("twinfer_prompt_tokens_total") == sum(r["total_input_tokens"] for r in results)
    assert delta("twinfer_generation_tokens_total") == sum(r["total_output_tokens"]
                                                           for r in results)
    assert delta("twinfer_requests_total/200") == 16


def test_prompt_tokens_of_n_choices_count_once_in_usage_and_metrics(tiny_model_factory):
    from openai import OpenAI

    llm = LLM(str(tiny_model_factory("llama")), engine="torch", max_model_len=128,
              max_num_seqs=8, num_kv_blocks=64)
    with running_server(llm.engine, MODEL) as (url, _):
        before = _counters(url)
        done = OpenAI(base_url=url + "/v1", api_key="none").completions.create(
            model=MODEL, prompt=[5, 6, 7, 8, 9], n=3, max_tokens=4,
            extra_body={"ignore_eos": True})
        after = _counters(url)
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (5, 12)
    assert after["twinfer_prompt_tokens_total"] - before.get("twinfer_prompt_tokens_total", 0) == 5
    assert after["twinfer_generation_tokens_total"] - \
        before.get("twinfer_generation_tokens_total", 0) == 12


def test_offline_benchmark_reports_every_batch_size(tiny_model_factory, tmp_path, capsys):
    path = tiny_model_factory("llama")
    rc = bench_main(["bench", "offline", str(path), "--engine", "torch", "--device", "cpu",
                     "--batch-sizes", "1,2", "--input-len", "8", "--output-len", "4",
                     "-o", str(tmp_path)])
    assert rc == 0
    assert "| batch |" in capsys.readouterr().out
    (out,) = tmp_path.glob("offline-*.json")
    report = json.loads(out.read_text())
    # Tiny llama: hidden 64, 4 heads of 16, 2 KV heads, MLP 128, 2 layers, vocab 256, fp32.
    layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64
    assert report["weight_bytes_per_step"] == 4 * (2 * layer + 64 + 256 * 64)
    assert report["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert report["copy_bandwidth"] is None and report["device"] == "cpu"
    rows = report["results"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r in rows:
        bs = r["batch_size"]
        assert r["output_tokens"] == 4 * bs and r["num_decode_steps"] == 3
        assert 0 < r["prefill_s"] < r["wall_s"] and r["decode_step_s"] > 0
        assert r["output_tok_per_s"] == pytest.approx(4 * bs / r["wall_s"])
        assert r["peak_memory_bytes"] > 0 and r["roofline_fraction"] is None
        assert r["decode_bytes_per_step"] == report["weight_bytes_per_step"] + bs * 10 * 512


def test_serve_compare_measures_each_variant_through_a_real_server(tiny_model_factory, tmp_path,
                                                                    capsys):
    from serving import free_port

    from bench.serve_compare import main as serve_compare
    serve_compare(["--model", str(tiny_model_factory("llama")), "--variants", "fp16,w8a16",
                   "--concurrency", "1,2", "--num-prompts", "2,2", "--input-len", "8",
                   "--output-len", "4", "--max-num-seqs", "4", "--port", str(free_port()),
                   "-o", str(tmp_path)])
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| fp16 |", "| w8a16 |"))]
    assert [r.split("|")[1:4] for r in rows] == [
        [" fp16 ", " 1 ", " 2 "], [" fp16 ", " 2 ", " 2 "],
        [" w8a16 ", " 1 ", " 2 "], [" w8a16 ", " 2 ", " 2 "]]
    assert all(r.split("|")[4].strip() == "0" for r in rows)  # no failed requests
