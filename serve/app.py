"""The FastAPI app: OpenAI-compatible routes over an AsyncEngine. No model logic lives here.

Every client error is answered in OpenAI's error schema (400 bad field, 401 key, 404 model,
413 body size, 503 queue full); the body is read and parsed by hand so that malformed bytes,
NaN, deep nesting or a huge body can never reach a 500.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.async_engine import AsyncEngine, QueueFullError
from serve.http_utils import ServerState, check_auth, read_json
from serve.metrics import ServerMetrics
from serve.protocol import (
    APIError,
    DetokenizeRequest,
    TokenizeRequest,
    error_response,
    parse_request,
)
from serve.routes_generate import ClientDisconnected, register_generate_routes
from twinfer.engine import LLMEngine

log = logging.getLogger("twinfer.serve")
DEFAULT_MAX_BODY_BYTES = 8 << 20


def create_app(engine: LLMEngine, model_name: str, api_key: str | None = None,
               max_waiting: int = 1024, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """Build the app around an LLMEngine; the engine thread runs while the app is up."""
    metrics = ServerMetrics(model_name)
    async_engine = AsyncEngine(engine, max_waiting, on_step=metrics.update_engine_gauges)
    state = ServerState(async_engine, metrics, model_name, api_key, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        metrics.update_engine_gauges(engine)
        yield
        async_engine.stop()

    app = FastAPI(title="twinfer", lifespan=lifespan)
    app.state.twinfer = state
    _register_error_handlers(app, state)
    _register_basic_routes(app, state)
    register_generate_routes(app, state)
    return app


def _register_error_handlers(app: FastAPI, state: ServerState) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        state.metrics.record_status(str(exc.status))
        return error_response(exc.status, exc.message, exc.type, exc.param)

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError):
        state.metrics.record_status("503")
        return error_response(503, str(exc), "server_overloaded")

    @app.exception_handler(ClientDisconnected)
    async def client_gone(request: Request, exc: ClientDisconnected):
        state.metrics.record_status("499")  # nginx's "client closed request": nobody reads it
        return error_response(499, "client disconnected", "client_disconnected")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, str(exc.errors()[0].get("msg", exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail),
                              "not_found_error" if exc.status_code == 404
                              else "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        state.metrics.record_status("500")
        return error_response(500, "internal server error", "internal_error")


def _register_basic_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        if not state.engine.is_healthy:
            return error_response(503, "engine is not running", "internal_error")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request, state)
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "twinfer", "max_model_len": state.max_model_len,
            # not in OpenAI's schema: lets load generators draw valid random token ids
            "vocab_size": state.engine.engine.config.model.vocab_size}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        check_auth(request, state)
        req = parse_request(TokenizeRequest, await read_json(request, state))
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        if req.messages is not None:
            ids = state.tokenizer.encode_chat([{"role": m.role, "content": m.text()}
                                               for m in req.messages])
        else:
            ids = state.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        check_auth(request, state)
        req = parse_request(DetokenizeRequest, await read_json(request, state))
        state.check_model(req.model)
        vocab = state.engine.engine.config.model.vocab_size
        bad = next((t for t in req.tokens if t >= vocab), None)
        if bad is not None:
            raise APIError(400, f"tokens: id {bad} is outside the vocabulary (size {vocab})",
                           param="tokens")
        return {"prompt": state.tokenizer.decode(req.tokens, skip_special_tokens=False)}
