"""Load generator for any OpenAI-compatible server (twinfer, vLLM, LMDeploy, ...).

    twinfer bench serve --base-url http://127.0.0.1:8000 [--model NAME] [--concurrency 1,100]
                        [--num-prompts N] [--input-len 2048] [--output-len 2048]
                        [--dataset random|sharegpt:FILE] [--endpoint completions|chat] [-o DIR]

For each concurrency level C, N streamed requests (default max(4C, 16)) are sent through a pool
of C in flight: a new request starts as soon as one finishes. Each asks for exactly
``output_len`` tokens (``max_tokens`` plus ``ignore_eos``) and for a final usage chunk
(``stream_options.include_usage``), so token counts are the server's own. Arithmetic: see
``bench/latency_stats.py``. Prints Markdown tables; writes one JSON file per run to ``-o DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict

from tqdm.auto import tqdm

from bench.latency_stats import RequestTiming, run_duration, summarize
from bench.report import environment, fmt, markdown_table, write_json
from bench.serve_prompts import Prompt, PromptSource, parse_token_range

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
WARMUP_MAX_TOKENS = 16


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server root, with or without /v1")
    p.add_argument("--model", default=None, help="model name to send (default: the first one "
                   "GET /v1/models lists)")
    p.add_argument("--endpoint", default="completions", choices=sorted(ENDPOINTS))
    p.add_argument("--concurrency", default="1,100", help="comma-separated levels, run in order")
    p.add_argument("--num-prompts", default=None,
                   help="requests per level: one number for every level, or one per level "
                   "(e.g. 4,100); default max(4 x concurrency, 16)")
    p.add_argument("--input-len", type=int, default=2048, help="random dataset prompt length")
    p.add_argument("--output-len", type=int, default=2048, help="max_tokens of every request")
    p.add_argument("--dataset", default="random", help="'random' or 'sharegpt:FILE'")
    p.add_argument("--random-prompt", default="auto", choices=["auto", "ids", "words"],
                   help="random prompts as token-id lists (exact lengths; completions only) or "
                   "words (any endpoint); auto: ids for completions, words for chat")
    p.add_argument("--token-range", default=None,
                   help="LO:HI, half-open range of random prompt token ids (default 100:10000, "
                   "narrowed to the vocabulary when the server's /v1/models gives vocab_size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="do not send ignore_eos (for servers that reject the field)")
    p.add_argument("--extra-body", default=None, help="JSON object merged into every request")
    p.add_argument("--num-warmups", type=int, default=1,
                   help="short requests sent before measuring (also checks the server answers)")
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("-o", "--output-dir", default="bench-results")


def run(args: argparse.Namespace) -> int:
    try:
        import httpx  # noqa: F401  (the 'dev' extra has it; fail here, not mid-benchmark)
    except ImportError:
        print("twinfer bench serve needs httpx: pip install httpx", file=sys.stderr)
        return 2
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency must list positive integers, got {args.concurrency!r}")
    counts = parse_num_prompts(args.num_prompts, levels)
    if args.output_len < 1:
        raise ValueError(f"--output-len must be at least 1, got {args.output_len}")
    return asyncio.run(_benchmark(args, levels, counts))


def parse_num_prompts(text: str | None, levels: list[int]) -> list[int]:
    """Requests per concurrency level from ``--num-prompts`` (one value, or one per level)."""
    if text is None:
        return [max(4 * c, 16) for c in levels]
    try:
        counts = [int(n) for n in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--num-prompts must be integers, got {text!r}") from None
    if len(counts) == 1:
        counts *= len(levels)
    if len(counts) != len(levels) or min(counts) < 1:
        raise ValueError(f"--num-prompts needs one positive count, or one per concurrency "
                         f"level ({len(levels)}), got {text!r}")
    return counts


async def _benchmark(args: argparse.Namespace, levels: list[int], counts: list[int]) -> int:
    import httpx

    base = args.base_url.rstrip("/").removesuffix("/v1")
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    extra = json.loads(args.extra_body) if args.extra_body else {}
    if not isinstance(extra, dict):
        raise ValueError("--extra-body must be a JSON object")
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels))
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(600.0, connect=60.0)) as client:
        try:
            card = await _model_card(client, args.model)
        except httpx.HTTPError as e:
            print(f"cannot list the server's models at {base}/v1/models: {e}", file=sys.stderr)
            return 1
        model = args.model or card["id"]
        source = _prompt_source(args, card.get("vocab_size"))
        shape = _BodyShape(args.endpoint, model, args.temperature, not args.no_ignore_eos, extra)
        for prompt in source.take(args.num_warmups):
            t = await send_request(client, args.endpoint,
                                   shape.body(prompt, min(args.output_len, WARMUP_MAX_TOKENS)),
                                   prompt.num_tokens)
            if not t.success:
                print(f"warm-up request failed: {t.error}", file=sys.stderr)
                return 1
        results = []
        for c, n in zip(levels, counts):
            requests = [(shape.body(p, args.output_len), p.num_tokens) for p in source.take(n)]
            timings = await run_level(client, args.endpoint, requests, c)
            results.append(_level_result(c, timings, args.output_len, shape.ignore_eos))
    print(format_report(base, model, args, results))
    path = write_json(args.output_dir, "serve", model, {
        "kind": "serve", "base_url": base, "model": model, "time_unit": "s",
        "config": {k: v for k, v in vars(args).items()
                   if k not in ("api_key", "func") and not callable(v)},
        "environment": environment(), "results": results})
    print(f"\nwrote {path}")
    return 0 if all(r["num_failed"] == 0 for r in results) else 1


def default_token_range(vocab_size: int | None) -> tuple[int, int]:
    """100:10000, inside the vocabulary when its size is known (ids below 100 are often
    special tokens in real vocabularies; tiny test vocabularies start at 2)."""
    if vocab_size is None or vocab_size >= 10000:
        return 100, 10000
    return (100 if vocab_size > 1000 else 2), vocab_size


def _prompt_source(args: argparse.Namespace, vocab_size: int | None) -> PromptSource:
    use_ids = args.random_prompt == "ids" or (args.random_prompt == "auto"
                                              and args.endpoint == "completions")
    if use_ids and args.endpoint == "chat":
        raise ValueError("--random-prompt ids needs --endpoint completions")
    token_range = (parse_token_range(args.token_range) if args.token_range
                   else default_token_range(vocab_size))
    return PromptSource(args.dataset, args.input_len, args.seed, use_ids, token_range)


async def _model_card(client, name: str | None) -> dict:
    """The /v1/models entry of ``name`` (default: the first listed); ``{"id": name}`` when
    the server does not list it."""
    r = await client.get("/v1/models")
    r.raise_for_status()
    cards = r.json()["data"]
    if name is None:
        return cards[0]
    return next((c for c in cards if c.get("id") == name), {"id": name})


class _BodyShape:
    """What every request of a run has in common; ``body`` fills in prompt and length."""

    def __init__(self, endpoint: str, model: str, temperature: float, ignore_eos: bool,
                 extra: dict):
        self.endpoint, self.model, self.temperature = endpoint, model, temperature
        self.ignore_eos, self.extra = ignore_eos, extra

    def body(self, prompt: Prompt, max_tokens: int) -> dict:
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": self.temperature,
                "stream": True, "stream_options": {"include_usage": True}}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt.prompt}]
        else:
            body["prompt"] = prompt.prompt
        if self.ignore_eos:
            body["ignore_eos"] = True
        return {**body, **self.extra}


async def run_level(client, endpoint: str, requests: list[tuple[dict, int | None]],
                    concurrency: int) -> list[RequestTiming]:
    """Send every (body, known prompt length) with at most ``concurrency`` in flight."""
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(requests), desc=f"concurrency {concurrency}", unit="req", leave=False)

    async def one(body: dict, num_prompt_tokens: int | None) -> RequestTiming:
        async with sem:
            timing = await send_request(client, endpoint, body, num_prompt_tokens)
        bar.update(1)
        return timing

    try:
        return list(await asyncio.gather(*(one(b, n) for b, n in requests)))
    finally:
        bar.close()


async def send_request(client, endpoint: str, body: dict,
                       num_prompt_tokens: int | None = None) -> RequestTiming:
    """Stream one request; never raises for HTTP or protocol errors (they go in ``error``)."""
    timing = RequestTiming(start=time.perf_counter())
    usage, done = None, False
    try:
        async with client.stream("POST", ENDPOINTS[endpoint], json=body) as r:
            if r.status_code != 200:
                text = (await r.aread())[:500].decode(errors="replace")
                timing.error = f"HTTP {r.status_code}: {text}"
                return timing
            async for line in r.aiter_lines():
                now = time.perf_counter()
                event = parse_sse_line(line, endpoint)
                if event is None:
                    continue
                if event.done:
                    done = True
                    break
                if event.error:
                    timing.error = event.error
                    return timing
                if event.text:
                    timing.chunk_times.append(now)
                usage = event.usage or usage
        if not done:
            timing.error = "the stream ended without [DONE]"
            return timing
        timing.success = True
    except Exception as e:  # connection refused, reset, bad JSON: a failed request
        timing.error = f"{type(e).__name__}: {e}"
    finally:
        timing.end = time.perf_counter()
        _fill_token_counts(timing, usage, num_prompt_tokens)
    return timing


def _fill_token_counts(timing: RequestTiming, usage: dict | None, known_prompt: int | None
                       ) -> None:
    """Token counts from the server's usage; otherwise the known prompt length and the number
    of token-bearing chunks (a lower bound)."""
    if usage and usage.get("completion_tokens") is not None:
        timing.usage_reported = True
        timing.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        timing.completion_tokens = int(usage["completion_tokens"])
    else:
        timing.prompt_tokens = known_prompt or 0
        timing.completion_tokens = len(timing.chunk_times)


class SSEEvent:
    def __init__(self, text: str = "", usage: dict | None = None, error: str | None = None,
                 done: bool = False):
        self.text, self.usage, self.error, self.done = text, usage, error, done


def parse_sse_line(line: str, endpoint: str) -> SSEEvent | None:
    """One ``data:`` line of an OpenAI stream; None for blank lines, comments, other fields."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return SSEEvent(done=True)
    data = json.loads(payload)
    if "error" in data:
        err = data["error"]
        return SSEEvent(error=str(err.get("message", err) if isinstance(err, dict) else err))
    text = ""
    if data.get("choices"):
        choice = data["choices"][0]
        if endpoint == "chat":
            delta = choice.get("delta") or {}
            text = delta.get("content") or delta.get("reasoning_content") or ""
        else:
            text = choice.get("text") or ""
    return SSEEvent(text=text, usage=data.get("usage"))


def _level_result(concurrency: int, timings: list[RequestTiming], output_len: int,
                  ignore_eos: bool) -> dict:
    summary = summarize(timings, run_duration(timings))
    short = sum(1 for t in timings if t.success and t.completion_tokens != output_len)
    errors = sorted({t.error for t in timings if t.error})
    return {"concurrency": concurrency, "num_prompts": len(timings), **asdict(summary),
            "num_output_len_mismatch": short if ignore_eos else None,
            "errors": errors[:10],
            "requests": [{"ttft": t.ttft, "e2e": t.e2e, "prompt_tokens": t.prompt_tokens,
                          "completion_tokens": t.completion_tokens,
                          "num_chunks": len(t.chunk_times), "error": t.error}
                         for t in timings]}


def format_report(base: str, model: str, args: argparse.Namespace, results: list[dict]) -> str:
    prompts = f"random, {args.input_len} tokens" if args.dataset == "random" else args.dataset
    head = (f"server: {base}  model: {model}  endpoint: {args.endpoint}  prompts: {prompts}  "
            f"output: {args.output_len} tokens")
    throughput = markdown_table(
        ["concurrency", "ok", "failed", "seconds", "input tokens", "output tokens", "req/s",
         "output tok/s", "total tok/s"],
        [[r["concurrency"], r["num_completed"], r["num_failed"], r["duration"],
          r["total_input_tokens"], r["total_output_tokens"], r["request_throughput"],
          fmt(r["output_throughput"], 1), fmt(r["total_token_throughput"], 1)]
         for r in results])
    rows = []
    for r in results:
        for key, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E")):
            s = r[key]
            rows.append([r["concurrency"], name] + ([s[k] * 1e3 for k in ("mean", "p50", "p90",
                                                                          "p99")]
                                                    if s else [None] * 4))
    latency = markdown_table(["concurrency", "latency (ms)", "mean", "p50", "p90", "p99"], rows)
    notes = []
    for r in results:
        if r["num_failed"]:
            notes.append(f"concurrency {r['concurrency']}: {r['num_failed']} failed, e.g. "
                         f"{r['errors'][0] if r['errors'] else '?'}")
        if r["num_without_usage"]:
            notes.append(f"concurrency {r['concurrency']}: {r['num_without_usage']} responses "
                         "had no usage; their token counts are chunk counts")
        if r["num_output_len_mismatch"]:
            notes.append(f"concurrency {r['concurrency']}: {r['num_output_len_mismatch']} "
                         f"requests did not return {args.output_len} tokens (ignore_eos unsupported?)")
    return "\n\n".join([head, throughput, latency] + (["\n".join(notes)] if notes else []))

