"""AsyncEngine: one thread drives LLMEngine; each request streams through an asyncio queue.

The engine is not thread-safe, so only the engine thread touches it: the event loop sends
commands (add, abort) through a thread-safe queue and gets RequestOutputs back through
``loop.call_soon_threadsafe``. Commands are applied between steps, so an abort (a client that
disconnected) frees its KV blocks before the next step runs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from twinfer.engine import LLMEngine
from twinfer.outputs import RequestOutput
from twinfer.sampling import SamplingParams

log = logging.getLogger("twinfer.serve")


class QueueFullError(RuntimeError):
    """The waiting queue already holds ``max_waiting`` requests."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sink: Callable[[RequestOutput | BaseException], None]
    arrival_time: float = field(default_factory=time.perf_counter)


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    """Serves many concurrent async callers from one LLMEngine running in its own thread."""

    def __init__(self, engine: LLMEngine, max_waiting: int = 1024,
                 on_step: Callable[[LLMEngine], None] | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self._on_step = on_step
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Callable] = {}
        self._num_pending = 0  # adds sent to the engine thread but not yet applied
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.dead_error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="twinfer-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def is_healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_error is None

    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self._num_pending

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative outputs until it finishes; aborts it if the caller
        stops iterating (e.g. the client disconnected)."""
        if not self.is_healthy:
            raise RuntimeError("the engine is not running")
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self.num_waiting() >= self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
            self._num_pending += 1
        self._commands.put(_Add(request_id, prompt_token_ids, params,
                                lambda item: loop.call_soon_threadsafe(outputs.put_nowait, item)))
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._commands.put(_Abort(request_id))

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._apply_commands(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        sink = self._sinks.get(out.request_id)
                        if sink is not None:
                            sink(out)
                        if out.finished:
                            self._sinks.pop(out.request_id, None)
                if self._on_step is not None:
                    self._on_step(self.engine)
        except BaseException as e:  # an engine bug: fail every request rather than hang them
            log.exception("engine loop died")
            self.dead_error = e
            for sink in self._sinks.values():
                sink(RuntimeError(f"engine failure: {e}"))

    def _apply_commands(self, block: bool) -> None:
        cmd = self._commands.get() if block else self._next_command()
        while cmd is not None:
            if isinstance(cmd, _Add):
                with self._lock:
                    self._num_pending -= 1
                try:
                    self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params)
                    self._sinks[cmd.request_id] = cmd.sink
                except ValueError as e:
                    cmd.sink(e)
            elif isinstance(cmd, _Abort):
                self._sinks.pop(cmd.request_id, None)
                self.engine.abort_request(cmd.request_id)
            cmd = self._next_command()

    def _next_command(self):
        try:
            return self._commands.get_nowait()
        except queue.Empty:
            return None
