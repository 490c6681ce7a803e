"""SamplingParams and the sampler shared by both engines.

The sampler takes float32 logits (one row per sequence that samples this step) and returns
one token per row. Order of operations, as in vLLM: penalties, temperature, top-k, top-p,
min-p, then a draw. Logprobs are those of the raw model distribution (log-softmax of the
logits before penalties and temperature). A seeded request draws from its own
``torch.Generator``, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from twinfer.device_copy import to_device_async

_MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; validated on construction."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n alternatives per generated token (0: sampled only)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.n != 1:
            raise ValueError("n must be 1 (parallel sampling is not supported yet)")
        _check_number("temperature", self.temperature, lo=0.0)
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off), 0 (off) or a positive int, got {self.top_k}")
        _check_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_number(name, value)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) \
                or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value <= _MAX_LOGPROBS):
                raise ValueError(f"{name} must be an int in [0, {_MAX_LOGPROBS}], got {value!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative ints")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        """Whether sampling needs the tokens seen so far (repetition/presence/frequency)."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) \
            or bool(self.frequency_penalty)


def _check_number(name: str, value: object, lo: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or math.isinf(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


@dataclass
class SamplerInput:
    """One row per sampling sequence: its params, generator and the tokens penalties see."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]


@dataclass
class SamplerOutput:
    """Sampled ids and, for rows that asked, (sampled logprob, top ids, top logprobs)."""

    token_ids: list[int]
    logprobs: list[tuple[float, list[int], list[float]] | None]


class SampledTokens:
    """A step's sampled ids, still on the device: ``token_ids`` can feed the next step's inputs
    before the host has them. On CUDA the copy to the host starts at once (into pinned memory,
    behind an event), so ``resolve`` waits for this step only, not for work queued after it."""

    def __init__(self, token_ids: torch.Tensor,
                 logprobs: list[tuple[float, list[int], list[float]] | None] | None = None):
        self.token_ids = token_ids
        self._logprobs = logprobs
        self._host = token_ids
        self._event = None
        if token_ids.is_cuda:
            self._host = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
            self._host.copy_(token_ids, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def resolve(self) -> SamplerOutput:
        """Wait for the ids and return them (with logprobs where rows asked for them)."""
        if self._event is not None:
            self._event.synchronize()
        ids = self._host.tolist()
        return SamplerOutput(token_ids=ids, logprobs=self._logprobs or [None] * len(ids))


class Sampler:
    """Turns logits into tokens according to each row's SamplingParams."""

    def __call__(self, logits: torch.Tensor, batch: SamplerInput) -> SamplerOutput:
        """logits: [num_rows, vocab] float32, one row per entry of ``batch``."""
        return self.sample(logits, batch).resolve()

    def sample(self, logits: torch.Tensor, batch: SamplerInput) -> SampledTokens:
        """Like ``__call__``, but the ids stay on the device. Nothing here waits for the
        device unless a row asks for logprobs (those are read back at once)."""
        raw_logprobs = None
        if any(p.logprobs is not None for p in batch.params):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        if any(p.uses_penalties for p in batch.params):
            logits = apply_penalties(logits.clone(), batch)
        # Greedy rows in one argmax; unseeded sampled rows together (a few kernels for the
        # whole batch, not ~10 per row); seeded rows one by one, each with its own generator,
        # so that a seeded request draws the same tokens whatever else is in the batch.
        token_ids = logits.argmax(dim=-1)
        unseeded = []
        for i, (params, gen) in enumerate(zip(batch.params, batch.generators)):
            if params.greedy:
                continue
            if gen is None:
                unseeded.append(i)
            else:
                token_ids[i] = _draw(logits[i], params, gen)
        if unseeded:
            rows = to_device_async(torch.tensor(unseeded), logits.device)
            drawn = draw_rows(logits.index_select(0, rows), [batch.params[i] for i in unseeded])
            token_ids.index_copy_(0, rows, drawn)
        if raw_logprobs is None:
            return SampledTokens(token_ids)
        ids = token_ids.tolist()
        logprobs: list = [None] * len(ids)
        for i, params in enumerate(batch.params):
            if params.logprobs is not None:
                logprobs[i] = top_logprobs(raw_logprobs[i], ids[i], params.logprobs)
        return SampledTokens(token_ids, logprobs)


def apply_penalties(logits: torch.Tensor, batch: SamplerInput) -> torch.Tensor:
    """Repetition (over prompt and output, HF-style), presence and frequency (over output)."""
    for i, params in enumerate(batch.params):
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(batch.prompt_token_ids[i]) |
                                       set(batch.output_token_ids[i])), dtype=torch.long,
                                device=logits.device)
            row = logits[i, seen]
            logits[i, seen] = torch.where(row > 0, row / params.repetition_penalty,
                                          row * params.repetition_penalty)
        if (params.presence_penalty or params.frequency_penalty) and batch.output_token_ids[i]:
            out = torch.tensor(batch.output_token_ids[i], dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[-1]).to(logits.dtype)
            logits[i] -= params.frequency_penalty * counts
            logits[i] -= params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def sample_row(logits: torch.Tensor, params: SamplingParams,
               generator: torch.Generator | None) -> int:
    """Pick one token from a row of logits [vocab]."""
    return int(_draw(logits, params, generator))


def _draw(logits: torch.Tensor, params: SamplingParams,
          generator: torch.Generator | None) -> torch.Tensor:
    """``sample_row`` as a 0-d device tensor (no wait for the device)."""
    if params.greedy:
        return torch.argmax(logits)
    probs = filtered_probs(logits[None], [params])[0]
    return torch.multinomial(probs, 1, generator=generator)[0]


def draw_rows(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """``sample_row`` for every row of logits [rows, vocab] at once (global RNG). Returns the
    drawn ids [rows] on logits' device, without waiting for the device."""
    return torch.multinomial(filtered_probs(logits, params), 1)[:, 0]


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Probabilities [rows, vocab] after each row's temperature, top-k, top-p and min-p, as
    per-row tensors: one sort for all rows when any filter needs it."""
    dev = logits.device
    rows, vocab = logits.shape
    temps, top_k, top_p, min_p = to_device_async(torch.tensor(
        [[p.temperature for p in params], [p.top_k if p.top_k > 0 else vocab for p in params],
         [p.top_p for p in params], [p.min_p for p in params]], dtype=torch.float32), dev)
    logits = logits / temps[:, None]
    if any(0 < p.top_k < vocab for p in params):
        ordered = torch.sort(logits, dim=-1, descending=True).values
        kth = ordered.gather(1, (top_k.long().clamp(max=vocab) - 1)[:, None])
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    if any(p.top_p < 1.0 for p in params):
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays);
        # masking, not a boolean index, which would wait for the device.
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p[:, None]
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    if any(p.min_p > 0.0 for p in params):
        probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
    return probs


def top_logprobs(logprobs: torch.Tensor, token_id: int, n: int
                 ) -> tuple[float, list[int], list[float]]:
    """The chosen token's logprob and the n most likely alternatives of one row."""
    top = torch.topk(logprobs, n) if n > 0 else None
    ids = top.indices.tolist() if top is not None else []
    values = top.values.tolist() if top is not None else []
    return float(logprobs[token_id]), ids, values
