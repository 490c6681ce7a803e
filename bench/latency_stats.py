"""Latency and throughput arithmetic of a serving benchmark. Pure functions, no I/O.

Per request, from the client's clock (seconds, ``time.perf_counter``):

    TTFT = first token-bearing chunk - start
    E2E  = end - start
    TPOT = (E2E - TTFT) / (output_tokens - 1)        requests with at least 2 output tokens
    ITL  = every gap between consecutive token-bearing chunks (pooled over requests)

A chunk may carry several tokens (a server that batches its stream, or one whose detokenizer
held text back), so ITL counts chunks while TPOT counts tokens. Failed requests count in
``num_failed`` only: they add nothing to latencies or token totals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class RequestTiming:
    """One request as the client saw it."""

    start: float
    chunk_times: list[float] = field(default_factory=list)  # arrivals of token-bearing chunks
    end: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    success: bool = False
    usage_reported: bool = False  # token counts came from the server's usage, not guessed
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.completion_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


@dataclass
class Stats:
    """Mean and percentiles of one latency, in the unit of its inputs."""

    mean: float
    p50: float
    p90: float
    p99: float
    count: int


@dataclass
class Summary:
    num_completed: int
    num_failed: int
    num_without_usage: int  # successful requests whose token counts were guessed
    duration: float  # seconds from the first request's start to the last one's end
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (input + output) tokens / s
    ttft: Stats | None
    tpot: Stats | None
    itl: Stats | None
    e2e: Stats | None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between the closest ranks,
    as ``numpy.percentile``'s default."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def describe(values: Sequence[float]) -> Stats | None:
    """Mean, p50, p90, p99 of ``values``; None when there are none."""
    if not values:
        return None
    p50, p90, p99 = (percentile(values, q) for q in PERCENTILES)
    return Stats(sum(values) / len(values), p50, p90, p99, len(values))


def summarize(timings: Sequence[RequestTiming], duration: float) -> Summary:
    """Aggregate the requests of one benchmark run that lasted ``duration`` seconds."""
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    ok = [t for t in timings if t.success]
    total_in = sum(t.prompt_tokens for t in ok)
    total_out = sum(t.completion_tokens for t in ok)
    ttfts = [t.ttft for t in ok if t.ttft is not None]
    tpots = [t.tpot for t in ok if t.tpot is not None]
    return Summary(
        num_completed=len(ok), num_failed=len(timings) - len(ok),
        num_without_usage=sum(1 for t in ok if not t.usage_reported),
        duration=duration, total_input_tokens=total_in, total_output_tokens=total_out,
        request_throughput=len(ok) / duration, output_throughput=total_out / duration,
        total_token_throughput=(total_in + total_out) / duration,
        ttft=describe(ttfts), tpot=describe(tpots),
        itl=describe([gap for t in ok for gap in t.itls]),
        e2e=describe([t.e2e for t in ok]))


def run_duration(timings: Sequence[RequestTiming]) -> float:
    """Seconds from the earliest start to the latest end."""
    return max(t.end for t in timings) - min(t.start for t in timings)
