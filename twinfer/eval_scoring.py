"""Evaluation's scoring core: next-token log-prob distributions through the engine's runner.

Evaluation generates nothing, so it bypasses the scheduler and the sampler and hands the
engine's runner (``engine_torch`` or ``engine_fast``, whatever model the engine loaded)
hand-built ``ScheduledBatch``es. Guarantees:

- A request is a token list plus the first position whose distribution is wanted; it gets the
  rows for positions ``first .. len - 2`` (position p's row is the distribution of token p + 1),
  as float32 ``log_softmax`` over the whole vocabulary, in position order, maybe in pieces.
- Requests are packed, in order, into batches of at most ``max_batch_tokens`` tokens and
  ``max_batch_seqs`` sequences. A request that does not fit in what is left of a batch continues
  in the next one, reading its earlier K/V from the paged cache (chunked prefill). So a window of
  any length up to ``max_model_len`` is scored with one batch's logits alive at a time, and only
  the rows asked for are computed.
- KV blocks come from the engine's ``BlockManager``: a request's blocks are allocated when its
  first chunk is scheduled and freed after its last chunk ran, or when the caller stops early or
  an error escapes. Nothing is published to the prefix cache.
- The engine must be idle: its scheduler owns the same blocks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from twinfer.batch import ScheduledBatch
from twinfer.engine import LLMEngine
from twinfer.sampling import SamplingParams
from twinfer.sequence import Sequence as EngineSequence

# (request index, first position, float32 log-probs [num_positions, vocab])
Piece = tuple[int, int, torch.Tensor]


@dataclass(frozen=True)
class ScoreRequest:
    """Score positions ``first .. len(token_ids) - 2`` of ``token_ids``."""

    token_ids: Sequence[int]
    first: int = 0

    @property
    def num_positions(self) -> int:
        return len(self.token_ids) - 1 - self.first


def engine_of(model) -> LLMEngine:
    """The LLMEngine behind an ``LLM`` (or the engine itself)."""
    engine = getattr(model, "engine", model)
    if not isinstance(engine, LLMEngine):
        raise TypeError(f"expected an LLM or an LLMEngine, got {type(model).__name__}")
    return engine


def iter_logprobs(engine: LLMEngine, requests: Sequence[ScoreRequest],
                  max_batch_tokens: int | None = None,
                  max_batch_seqs: int | None = None) -> Iterator[Piece]:
    """Yield ``(request index, first position, logprobs)`` pieces covering every request's
    wanted positions, request after request; see the module docstring."""
    cfg = engine.config.scheduler
    budget_max = max_batch_tokens or cfg.max_num_batched_tokens
    seqs_max = max_batch_seqs or cfg.max_num_seqs
    _check_requests(engine, requests)
    block_manager = engine.block_manager
    live: dict[int, EngineSequence] = {}  # requests holding KV blocks
    queue = deque(range(len(requests)))
    try:
        while queue:
            pieces = _next_pieces(engine, requests, queue, live, budget_max, seqs_max)
            batch = _build_batch(pieces, requests, block_manager.block_size)
            with torch.inference_mode():
                logprobs = engine.runner.execute(batch)  # [rows, vocab] float32
                logprobs -= torch.logsumexp(logprobs, dim=-1, keepdim=True)  # in place
            row = 0
            for idx, seq, start, end in pieces:
                seq.num_computed_tokens = end
                lo = max(start, requests[idx].first)
                hi = min(end, len(requests[idx].token_ids) - 1)
                if end == seq.num_tokens:
                    block_manager.free(live.pop(idx))
                if lo < hi:
                    yield idx, lo, logprobs[row:row + hi - lo]
                    row += hi - lo
            del logprobs  # before the next batch's logits exist
    finally:
        for seq in live.values():
            block_manager.free(seq)


def _check_requests(engine: LLMEngine, requests: Sequence[ScoreRequest]) -> None:
    if engine.has_unfinished_requests():
        raise RuntimeError("evaluation needs an idle engine: finish or abort its requests first")
    max_len = engine.config.scheduler.max_model_len
    vocab = engine.config.model.vocab_size
    for i, r in enumerate(requests):
        if not 0 <= r.first < len(r.token_ids) - 1:
            raise ValueError(f"request {i}: first={r.first} leaves no position to score in "
                             f"{len(r.token_ids)} tokens")
        if len(r.token_ids) > max_len:
            raise ValueError(f"request {i} has {len(r.token_ids)} tokens, more than "
                             f"max_model_len={max_len}")
        if min(r.token_ids) < 0 or max(r.token_ids) >= vocab:
            raise ValueError(f"request {i}: token ids must be in [0, {vocab})")


def _next_pieces(engine: LLMEngine, requests: Sequence[ScoreRequest], queue: deque[int],
                 live: dict[int, EngineSequence], budget: int, max_seqs: int
                 ) -> list[tuple[int, EngineSequence, int, int]]:
    """Take (request, seq, start, end) chunks off the queue for one batch, allocating blocks."""
    pieces = []
    while queue and budget > 0 and len(pieces) < max_seqs:
        idx = queue[0]
        seq = live.get(idx)
        if seq is None:
            seq = EngineSequence(f"eval-{idx}", list(requests[idx].token_ids), SamplingParams())
            if not engine.block_manager.allocate(seq, seq.num_tokens):
                if pieces:
                    break  # run what we have; its blocks come back afterwards
                raise RuntimeError(f"the KV cache has {engine.block_manager.num_free_blocks} "
                                   f"free blocks, too few for {seq.num_tokens} tokens")
            live[idx] = seq
        start = seq.num_computed_tokens
        end = min(seq.num_tokens, start + budget)
        pieces.append((idx, seq, start, end))
        budget -= end - start
        if end < seq.num_tokens:
            break  # the rest goes in the next batch
        queue.popleft()
    return pieces


def _build_batch(pieces: list[tuple[int, EngineSequence, int, int]],
                 requests: Sequence[ScoreRequest], block_size: int) -> ScheduledBatch:
    batch = ScheduledBatch(seqs=[], input_ids=[], positions=[], query_lens=[], context_lens=[],
                           block_tables=[], slot_mapping=[], logits_indices=[],
                           sample_seq_indices=[], sample_logit_rows=[])
    for idx, seq, start, end in pieces:
        row0 = len(batch.input_ids)
        table = seq.block_table
        batch.seqs.append(seq)
        batch.input_ids += seq.token_ids[start:end]
        batch.positions += range(start, end)
        batch.query_lens.append(end - start)
        batch.context_lens.append(end)
        batch.block_tables.append(list(table))
        batch.slot_mapping += [table[p // block_size] * block_size + p % block_size
                               for p in range(start, end)]
        lo = max(start, requests[idx].first)
        hi = min(end, len(requests[idx].token_ids) - 1)
        batch.logits_indices += [row0 + p - start for p in range(lo, hi)]
    return batch


def iter_aligned(a: Iterator[Piece], b: Iterator[Piece]
                 ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Zip two piece streams over the same requests into ``(index, first, rows_a, rows_b)``
    pieces of equal positions, whatever batch boundaries each engine used."""
    pa = pb = None
    while True:
        pa = pa if pa is not None else next(a, None)
        pb = pb if pb is not None else next(b, None)
        if pa is None or pb is None:
            if pa is not None or pb is not None:
                raise RuntimeError("the two models scored different numbers of positions")
            return
        (ia, la, ra), (ib, lb, rb) = pa, pb
        if (ia, la) != (ib, lb) or ra.shape[1] != rb.shape[1]:
            raise RuntimeError(f"misaligned scores: request {ia} position {la} against request "
                               f"{ib} position {lb}, vocab {ra.shape[1]} against {rb.shape[1]}")
        n = min(len(ra), len(rb))
        yield ia, la, ra[:n], rb[:n]
        pa = (ia, la + n, ra[n:]) if len(ra) > n else None
        pb = (ib, lb + n, rb[n:]) if len(rb) > n else None
