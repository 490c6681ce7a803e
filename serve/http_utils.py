"""Request plumbing shared by the routes: state, body reading, auth, SSE and stream merging."""

from __future__ import annotations

import asyncio
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from serve.async_engine import AsyncEngine
from serve.metrics import ServerMetrics
from serve.protocol import APIError

MAX_JSON_DEPTH = 64


@dataclass
class ServerState:
    """What the routes share: the engine, its tokenizer, metrics and the server's settings."""

    engine: AsyncEngine
    metrics: ServerMetrics
    model_name: str
    api_key: str | None
    max_body_bytes: int

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.config.scheduler.max_model_len

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves "
                           f"{self.model_name!r}", "not_found_error", "model")

    def check_capacity(self, num_requests: int) -> None:
        if self.engine.num_waiting() + num_requests > self.engine.max_waiting:
            raise APIError(503, f"server overloaded: the waiting queue is full "
                           f"({self.engine.max_waiting} requests); retry later",
                           "server_overloaded")


async def read_json(request: Request, state: ServerState) -> object:
    """The request body as JSON, enforcing the size limit while reading."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > state.max_body_bytes:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of "
                       f"{state.max_body_bytes}", param="body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > state.max_body_bytes:
            raise APIError(413, f"request body exceeds the limit of {state.max_body_bytes} "
                           "bytes", param="body")
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 ({e.reason} at byte "
                       f"{e.start})") from None
    if _nesting_depth(text) > MAX_JSON_DEPTH:
        raise APIError(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


def _nesting_depth(text: str) -> int:
    """Upper bound on JSON nesting (brackets inside strings count too, which only errs
    towards rejecting absurd documents early, before the recursive parser sees them)."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def check_auth(request: Request, state: ServerState) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(),
                                                             state.api_key.encode()):
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                       "authentication_error")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


async def merge_streams(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several async iterators, yielding (index, item); an exception from one is
    yielded as an item. Cancels the rest when the consumer stops early."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator) -> None:
        try:
            async with aclosing(stream) as s:
                async for item in s:
                    await queue.put((i, item))
        except Exception as e:  # delivered to the consumer, which reports it
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def streaming_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
