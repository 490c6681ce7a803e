"""POST /v1/completions and /v1/chat/completions, streamed or not.

Each (prompt, choice) pair becomes one engine request (a ``Job``); n > 1 fans out with seeds
seed, seed + 1, ... Outputs from the engine are cumulative; the stream sends the differences.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from dataclasses import dataclass, field

from fastapi import FastAPI, Request

from serve.async_engine import QueueFullError
from serve.formatting import chat_logprobs, completion_logprobs, usage
from serve.http_utils import (
    ServerState,
    check_auth,
    merge_streams,
    new_id,
    read_json,
    sse,
    streaming_response,
)
from serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_request
from twinfer.outputs import RequestOutput
from twinfer.sampling import SamplingParams


@dataclass
class Job:
    """One engine request: choice ``index`` of the response."""

    index: int
    prompt_index: int
    prompt_text: str
    prompt_ids: list[int]
    params: SamplingParams
    discard_output: bool = False  # max_tokens=0: only the prompt (echo / logprobs) is wanted
    # The n choices of one prompt are n engine requests; usage and /metrics count the prompt once.
    counts_prompt: bool = True
    # streaming progress
    sent_chars: int = 0
    sent_tokens: int = 0
    started: bool = False
    final: RequestOutput | None = field(default=None, repr=False)

    def completion_tokens(self) -> int:
        if self.final is None or self.discard_output:
            return 0
        return len(self.final.outputs[0].token_ids)


def _sampling_params(req, max_tokens: int, seed_offset: int, logprobs: int | None,
                     prompt_logprobs: int | None) -> SamplingParams:
    seed = None if req.seed is None else (req.seed + seed_offset) % 2 ** 64
    try:
        return SamplingParams(
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty, seed=seed, max_tokens=max_tokens,
            stop=req.stop_list(), stop_token_ids=list(req.stop_token_ids),
            ignore_eos=req.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=req.skip_special_tokens)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _check_common(req, state: ServerState) -> None:
    state.check_model(req.model)
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")


def _max_tokens(requested: int | None, prompt_len: int, state: ServerState, field: str) -> int:
    room = state.max_model_len - prompt_len
    if room <= 0:
        raise APIError(400, f"prompt has {prompt_len} tokens, but this model's maximum context "
                       f"length is {state.max_model_len} tokens (at least one must be left for "
                       "the completion)", param="prompt")
    if requested is None:
        return room
    if requested > room:
        raise APIError(400, f"{field}={requested} is too large: the prompt has {prompt_len} "
                       f"tokens and the maximum context length is {state.max_model_len}, "
                       f"leaving room for {room}", param=field)
    return requested


async def _tracked(state: ServerState, job: Job) -> AsyncIterator[RequestOutput]:
    """The job's outputs from the engine, recording latency and token metrics."""
    m = state.metrics
    start = time.perf_counter()
    first = None
    out = None
    async with aclosing(state.engine.generate(new_id("req"), job.prompt_ids, job.params)) as g:
        async for out in g:
            if first is None:
                first = time.perf_counter()
                m.ttft.observe(first - start)
            yield out
    if out is not None and out.finished:
        end = time.perf_counter()
        n = len(out.outputs[0].token_ids)
        m.e2e.observe(end - start)
        if n > 1:
            m.tpot.observe((end - first) / (n - 1))
        if job.counts_prompt:
            m.prompt_tokens.inc(len(job.prompt_ids))
        m.generation_tokens.inc(n)


async def _run_all(state: ServerState, jobs: list[Job]) -> None:
    """Run jobs to completion (non-streaming), filling ``job.final``."""
    async for i, item in merge_streams([_tracked(state, j) for j in jobs]):
        if isinstance(item, Exception):
            raise _as_api_error(item)
        jobs[i].final = item


# How often a non-streaming request checks that its client is still connected.
_DISCONNECT_POLL_S = 0.25


class ClientDisconnected(Exception):
    """The client went away before its non-streaming response was ready."""


async def _run_while_connected(request: Request, state: ServerState, jobs: list[Job]) -> None:
    """``_run_all``, aborting the jobs (and so freeing their KV blocks) when the client
    disconnects: a streaming request notices on its next write, a non-streaming one would
    otherwise run to max_tokens for nobody."""
    task = asyncio.ensure_future(_run_all(state, jobs))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()  # closes the engine streams, which abort their requests
            with suppress(asyncio.CancelledError):
                await task


def _as_api_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), "server_overloaded")
    return APIError(500, f"engine error: {e}", "internal_error")


async def _stream(state: ServerState, jobs: list[Job], make_chunks, final_chunk) -> AsyncIterator:
    """SSE events: chunks per job output, an optional usage chunk, then [DONE]."""
    try:
        async for i, item in merge_streams([_tracked(state, j) for j in jobs]):
            if isinstance(item, Exception):
                err = _as_api_error(item)
                yield sse({"error": {"message": err.message, "type": err.type,
                                     "param": err.param, "code": err.status}})
                break
            jobs[i].final = item
            for chunk in make_chunks(jobs[i], item):
                yield sse(chunk)
        else:
            if final_chunk is not None:
                yield sse(final_chunk())
        state.metrics.record_status("200")
        yield sse("[DONE]")
    except BaseException:
        state.metrics.record_status("499")  # client went away mid-stream
        raise


def _usage_of(jobs: list[Job]) -> dict:
    return usage(sum(len(j.prompt_ids) for j in jobs if j.counts_prompt),
                 sum(j.completion_tokens() for j in jobs))


# -- /v1/completions --------------------------------------------------------------------------


def _completion_jobs(req: CompletionRequest, state: ServerState) -> list[Job]:
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of must equal n (beam search is not supported)",
                       param="best_of")
    jobs = []
    for p_idx, p in enumerate(prompts):
        try:
            ids = state.engine.engine.encode_prompt(p)
        except ValueError as e:
            raise APIError(400, f"prompt: {e}", param="prompt") from None
        text = p if isinstance(p, str) else state.tokenizer.decode(ids, skip_special_tokens=False)
        discard = req.max_tokens == 0
        if discard and not req.echo:
            raise APIError(400, "max_tokens=0 needs echo=true (only the prompt is returned)",
                           param="max_tokens")
        max_tokens = _max_tokens(None if req.max_tokens is None else max(req.max_tokens, 1),
                                 len(ids), state, "max_tokens")
        prompt_lp = req.logprobs if req.echo and req.logprobs is not None else None
        for i in range(req.n):
            params = _sampling_params(req, max_tokens, i, req.logprobs, prompt_lp)
            jobs.append(Job(len(jobs), p_idx, text, ids, params, discard,
                            counts_prompt=i == 0))
    return jobs


def _completion_choice_text_and_logprobs(job: Job, req: CompletionRequest,
                                         decoder) -> tuple[str, dict]:
    out = job.final
    comp = out.outputs[0]
    text = "" if job.discard_output else comp.text
    token_ids: list[int] = []
    entries: list = []
    if req.echo:
        text = job.prompt_text + text
        if req.logprobs is not None:
            token_ids += out.prompt_token_ids
            entries += out.prompt_logprobs
    if req.logprobs is not None and not job.discard_output:
        token_ids += comp.token_ids
        entries += comp.logprobs
    lp = completion_logprobs(token_ids, entries, req.logprobs, 0, decoder) \
        if req.logprobs is not None else None
    return text, lp


def _finish_reason(job: Job) -> str | None:
    if job.discard_output:
        return "length"
    return job.final.outputs[0].finish_reason


async def _accept(request: Request, state: ServerState, request_cls, make_jobs):
    """Authenticate, parse and validate a generation request; its jobs, if there is room."""
    check_auth(request, state)
    req = parse_request(request_cls, await read_json(request, state))
    _check_common(req, state)
    jobs = make_jobs(req, state)
    state.check_capacity(len(jobs))
    return req, jobs


def _usage_chunk(req, base: dict, jobs: list[Job]):
    """The final usage-only chunk of a stream, when stream_options.include_usage asks."""
    if not (req.stream_options and req.stream_options.include_usage):
        return None
    return lambda: {**base, "choices": [], "usage": _usage_of(jobs)}


async def create_completion(request: Request, state: ServerState):
    req, jobs = await _accept(request, state, CompletionRequest, _completion_jobs)
    rid, created = new_id("cmpl"), int(time.time())
    base = {"id": rid, "object": "text_completion", "created": created,
            "model": state.model_name}

    def decoder(token_id: int) -> str:
        return state.tokenizer.decode([token_id], skip_special_tokens=False)
    if not req.stream:
        await _run_while_connected(request, state, jobs)
        choices = []
        for job in jobs:
            text, lp = _completion_choice_text_and_logprobs(job, req, decoder)
            choices.append({"index": job.index, "text": text, "logprobs": lp,
                            "finish_reason": _finish_reason(job),
                            "stop_reason": job.final.outputs[0].stop_reason})
        state.metrics.record_status("200")
        return {**base, "choices": choices, "usage": _usage_of(jobs)}

    def chunks(job: Job, out: RequestOutput):
        comp = out.outputs[0]
        text, lp_ids, lp_entries = "", [], []
        if not job.started:
            job.started = True
            if req.echo:
                text = job.prompt_text
                if req.logprobs is not None:
                    lp_ids, lp_entries = list(out.prompt_token_ids), list(out.prompt_logprobs)
        if not job.discard_output:
            text += comp.text[job.sent_chars:]
            if req.logprobs is not None:
                lp_ids += comp.token_ids[job.sent_tokens:]
                lp_entries += comp.logprobs[job.sent_tokens:]
            job.sent_chars, job.sent_tokens = len(comp.text), len(comp.token_ids)
        finish = _finish_reason(job) if out.finished else None
        if not text and finish is None and not lp_ids:
            return []
        lp = completion_logprobs(lp_ids, lp_entries, req.logprobs, 0, decoder) \
            if req.logprobs is not None else None
        return [{**base, "choices": [{"index": job.index, "text": text, "logprobs": lp,
                                      "finish_reason": finish}]}]

    return streaming_response(_stream(state, jobs, chunks, _usage_chunk(req, base, jobs)))


# -- /v1/chat/completions ---------------------------------------------------------------------


def _chat_jobs(req: ChatCompletionRequest, state: ServerState) -> list[Job]:
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        ids = state.tokenizer.encode_chat(messages, req.add_generation_prompt)
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    except Exception as e:  # the template itself may reject a conversation (jinja raise)
        raise APIError(400, f"messages: the chat template rejected them ({e})",
                       param="messages") from None
    if not ids:
        raise APIError(400, "messages: the rendered conversation is empty", param="messages")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens disagree",
                       param="max_completion_tokens")
    requested = req.max_completion_tokens or req.max_tokens
    max_tokens = _max_tokens(requested, len(ids), state, "max_completion_tokens"
                             if req.max_completion_tokens else "max_tokens")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return [Job(i, 0, "", ids, _sampling_params(req, max_tokens, i, logprobs, None),
                counts_prompt=i == 0)
            for i in range(req.n)]


async def create_chat_completion(request: Request, state: ServerState):
    req, jobs = await _accept(request, state, ChatCompletionRequest, _chat_jobs)
    rid, created = new_id("chatcmpl"), int(time.time())
    base = {"id": rid, "created": created, "model": state.model_name}
    top_n = req.top_logprobs or 0

    if not req.stream:
        await _run_while_connected(request, state, jobs)
        choices = []
        for job in jobs:
            comp = job.final.outputs[0]
            choices.append({
                "index": job.index,
                "message": {"role": "assistant", "content": comp.text},
                "logprobs": chat_logprobs(comp.token_ids, comp.logprobs, top_n)
                if req.logprobs else None,
                "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason})
        state.metrics.record_status("200")
        return {**base, "object": "chat.completion", "choices": choices,
                "usage": _usage_of(jobs)}

    chunk_base = {**base, "object": "chat.completion.chunk"}

    def chunks(job: Job, out: RequestOutput):
        comp = out.outputs[0]
        result = []
        if not job.started:
            job.started = True
            result.append({**chunk_base, "choices": [{
                "index": job.index, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}]})
        text = comp.text[job.sent_chars:]
        lp = None
        if req.logprobs:
            lp = chat_logprobs(comp.token_ids[job.sent_tokens:],
                               comp.logprobs[job.sent_tokens:], top_n)
        job.sent_chars, job.sent_tokens = len(comp.text), len(comp.token_ids)
        finish = comp.finish_reason if out.finished else None
        if text or finish is not None or (lp and lp["content"]):
            result.append({**chunk_base, "choices": [{
                "index": job.index, "delta": {"content": text} if text else {},
                "logprobs": lp, "finish_reason": finish}]})
        return result

    return streaming_response(_stream(state, jobs, chunks,
                                      _usage_chunk(req, chunk_base, jobs)))


def register_generate_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request):
        return await create_completion(request, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await create_chat_completion(request, state)
