"""AsyncEngine: one thread drives LLMEngine; each request streams through an asyncio queue.

The engine is not thread-safe, so only the engine thread touches it: the event loop sends
commands (add, abort) through a thread-safe queue and gets RequestOutputs back through one
``loop.call_soon_threadsafe`` per step for the whole batch (one per request cost the engine
thread ~1.5 us each in the self-pipe write, and woke the loop as often). Commands are applied
between steps, so an abort (a client that disconnected) frees its KV blocks before the next
step runs.

Outputs are cumulative, so each request keeps only its newest one (``_OutputSlot``): when the
event loop falls behind the engine (many streams), a stream sends fewer, larger chunks instead
of working through a backlog, as vLLM's output collector does.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from twinfer.engine import LLMEngine
from twinfer.outputs import RequestOutput
from twinfer.sampling import SamplingParams

log = logging.getLogger("twinfer.serve")


class QueueFullError(RuntimeError):
    """The waiting queue already holds ``max_waiting`` requests."""


class _OutputSlot:
    """The newest output (or the error) of one request, read by its event loop."""

    def __init__(self) -> None:
        self._item: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Event-loop thread only. An error is never overwritten; an output replaces an
        unread older one (outputs are cumulative)."""
        if not isinstance(self._item, BaseException):
            self._item = item
            self._ready.set()

    async def get(self) -> RequestOutput | BaseException:
        await self._ready.wait()
        self._ready.clear()
        item, self._item = self._item, None
        return item


def _deliver(items: list[tuple[_OutputSlot, RequestOutput | BaseException]]) -> None:
    for slot, item in items:
        slot.put(item)


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    slot: _OutputSlot
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
        self._slots: dict[str, tuple[asyncio.AbstractEventLoop, _OutputSlot]] = {}
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
        slot = _OutputSlot()
        with self._lock:
            if self.num_waiting() >= self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
            self._num_pending += 1
        self._commands.put(_Add(request_id, prompt_token_ids, params,
                                asyncio.get_running_loop(), slot))
        finished = False
        try:
            while True:
                item = await slot.get()
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
                    batches = defaultdict(list)
                    for out in self.engine.step():
                        target = (self._slots.pop(out.request_id, None) if out.finished
                                  else self._slots.get(out.request_id))
                        if target is not None:
                            batches[target[0]].append((target[1], out))
                    self._send(batches)
                if self._on_step is not None:
                    self._on_step(self.engine)
        except BaseException as e:  # an engine bug: fail every request rather than hang them
            log.exception("engine loop died")
            self.dead_error = e
            batches = defaultdict(list)
            for loop, slot in self._slots.values():
                batches[loop].append((slot, RuntimeError(f"engine failure: {e}")))
            self._send(batches)

    @staticmethod
    def _send(batches: dict) -> None:
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass

    def _apply_commands(self, block: bool) -> None:
        cmd = self._commands.get() if block else self._next_command()
        while cmd is not None:
            if isinstance(cmd, _Add):
                with self._lock:
                    self._num_pending -= 1
                try:
                    self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params)
                    self._slots[cmd.request_id] = (cmd.loop, cmd.slot)
                except ValueError as e:
                    self._send({cmd.loop: [(cmd.slot, e)]})
            elif isinstance(cmd, _Abort):
                self._slots.pop(cmd.request_id, None)
                self.engine.abort_request(cmd.request_id)
            cmd = self._next_command()

    def _next_command(self):
        try:
            return self._commands.get_nowait()
        except queue.Empty:
            return None
