"""Persistent-batch scheduler: continuous batching, chunked prefill, preemption by recompute.

Each step, ``schedule`` builds one ``ScheduledBatch`` under two budgets, ``max_num_seqs``
sequences and ``max_num_batched_tokens`` tokens. Guarantees, in this order:

1. Running sequences go first, oldest first. A decode costs one token; a sequence still in
   its prompt gets as many prompt tokens as the budget left allows (chunked prefill), so long
   prompts share steps with decodes.
2. When the KV cache cannot hold a running sequence's next tokens, the newest running
   sequence is preempted: its blocks are freed, its progress reset, and it returns to the front
   of the waiting queue keeping every token it generated (they are recomputed, not lost). A
   sequence may preempt itself when it is the newest.
3. Waiting sequences are admitted first-come-first-served (no overtaking) while budgets and
   blocks allow, but never in a step that preempted. On first admission a sequence reuses every
   cached block of its prompt prefix.
4. Nothing is dropped or truncated: every sequence ends finished (stop, length or abort) with
   its blocks returned.

A step's result reaches the scheduler in two halves, so that the engine can schedule step
n + 1 while step n still runs on the device (asynchronous scheduling): ``advance`` right after
a batch is launched (its tokens count as computed; every sampling sequence gets one pending
token, whose value only the device knows yet), ``commit`` once the sampled ids are on the host
(pending tokens become real ones, token-level stops finish sequences). ``update`` is both at
once. A sequence whose pending tokens already reach its length limit is not scheduled again,
and a preempted sequence is re-admitted only after its pending token is known.
"""

from __future__ import annotations

from collections import deque

from twinfer.batch import ScheduledBatch
from twinfer.config import SchedulerConfig
from twinfer.kv_cache import BlockManager
from twinfer.sequence import Sequence, SequenceStatus


class Scheduler:
    """Decides, each step, which tokens of which sequences run."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 eos_token_ids: tuple[int, ...] = ()):
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if seq.num_tokens > self.config.max_model_len:
            raise ValueError(f"prompt of {seq.num_tokens} tokens exceeds max_model_len "
                             f"{self.config.max_model_len}")
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a request wherever it is, returning its blocks; None if unknown."""
        for seq in list(self.waiting) + self.running:
            if seq.request_id == request_id:
                self.finish(seq, SequenceStatus.FINISHED_ABORTED)
                return seq
        return None

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Mark ``seq`` finished and return its blocks (full ones stay in the prefix cache)."""
        seq.set_status(status)
        seq.num_pending_tokens = 0  # whatever the device still computes for it is discarded
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> ScheduledBatch:
        """Pick this step's sequences and token chunks."""
        budget = self.config.max_num_batched_tokens
        chunks: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending_tokens and self._reaches_length_limit(seq):
                i += 1  # its last token is still on the device; commit will finish it
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate(seq, seq.num_computed_tokens + num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                chunks.append((seq, num_new))
                budget -= num_new
                i += 1

        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            if seq.num_pending_tokens:  # preempted while its last token was in flight
                break
            cached = []
            if seq.num_computed_tokens == 0 and seq.params.prompt_logprobs is None:
                cached = self.block_manager.find_cached_prefix(seq)
            num_computed = len(cached) * self.block_manager.block_size
            num_new = min(seq.num_tokens - num_computed, budget)
            if not self.block_manager.allocate(seq, num_computed + num_new, cached):
                break
            self.waiting.popleft()
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_computed
            seq.num_computed_tokens = num_computed
            seq.set_status(SequenceStatus.RUNNING)
            self.running.append(seq)
            chunks.append((seq, num_new))
            budget -= num_new
        return self._build_batch(chunks, preempted)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.set_status(SequenceStatus.WAITING)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _build_batch(self, chunks: list[tuple[Sequence, int]],
                     preempted: list[Sequence]) -> ScheduledBatch:
        batch = ScheduledBatch(seqs=[], input_ids=[], positions=[], query_lens=[],
                               context_lens=[], block_tables=[], slot_mapping=[],
                               logits_indices=[], sample_seq_indices=[], sample_logit_rows=[],
                               preempted=preempted)
        bs = self.block_manager.block_size
        for idx, (seq, num_new) in enumerate(chunks):
            start = seq.num_computed_tokens
            end = start + num_new
            row0 = len(batch.input_ids)
            batch.seqs.append(seq)
            known = seq.token_ids[start:end]
            batch.input_ids += known
            for row in range(row0 + len(known), row0 + num_new):
                batch.input_ids.append(0)  # a pending token: the runner takes it on the device
                batch.pending_input_rows.append((row, idx))
            batch.positions += range(start, end)
            batch.query_lens.append(num_new)
            batch.context_lens.append(end)
            batch.block_tables.append(list(seq.block_table))
            table = seq.block_table
            batch.slot_mapping += [table[p // bs] * bs + p % bs for p in range(start, end)]
            if seq.params.prompt_logprobs is not None:
                # Position p predicts token p + 1; rows already recorded (before a
                # preemption) are not recorded again.
                first = max(start, len(seq.prompt_logprobs))
                last = min(end, seq.num_prompt_tokens - 1)
                if first < last:
                    batch.prompt_logprob_rows[idx] = list(range(len(batch.logits_indices),
                                                                len(batch.logits_indices)
                                                                + last - first))
                    batch.logits_indices += [row0 + p - start for p in range(first, last)]
            if end == seq.num_tokens:
                batch.sample_seq_indices.append(idx)
                batch.sample_logit_rows.append(len(batch.logits_indices))
                batch.logits_indices.append(row0 + num_new - 1)
        return batch

    def update(self, batch: ScheduledBatch, sampled: list[int]) -> list[Sequence]:
        """``advance`` then ``commit``: the step's result when it is known at once."""
        self.advance(batch)
        return self.commit(batch, sampled)

    def advance(self, batch: ScheduledBatch) -> None:
        """The batch is launched: its tokens count as computed, and every sequence that samples
        holds one pending token until ``commit``."""
        for seq, num_new in zip(batch.seqs, batch.query_lens):
            seq.num_computed_tokens += num_new
        for idx in batch.sample_seq_indices:
            batch.seqs[idx].num_pending_tokens += 1

    def commit(self, batch: ScheduledBatch, sampled: list[int]) -> list[Sequence]:
        """The batch's sampled tokens (one per ``sample_seq_indices`` entry) are known: append
        them, publish full computed blocks to the prefix cache and finish sequences that hit a
        token-level stop. Sequences finished meanwhile (aborted, or stopped by an earlier
        step's token) drop theirs. Returns the sequences that received a token."""
        got_token = []
        for idx, token in zip(batch.sample_seq_indices, sampled, strict=True):
            seq = batch.seqs[idx]
            if seq.is_finished:
                continue
            seq.num_pending_tokens -= 1
            seq.token_ids.append(token)
            got_token.append(seq)
        for seq in batch.seqs:
            if not seq.is_finished:
                self.block_manager.cache_computed_blocks(seq)
        for seq in got_token:
            status = self._token_stop_status(seq)
            if status is not None:
                self.finish(seq, status)
        return got_token

    def _token_stop_status(self, seq: Sequence) -> SequenceStatus | None:
        params, last = seq.params, seq.token_ids[-1]
        if last in params.stop_token_ids:
            return SequenceStatus.FINISHED_STOPPED
        if not params.ignore_eos and last in self.eos_token_ids:
            return SequenceStatus.FINISHED_STOPPED
        if seq.num_output_tokens >= params.max_tokens or len(seq.token_ids) >= \
                self.config.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    def _reaches_length_limit(self, seq: Sequence) -> bool:
        """Whether the tokens known and pending already end ``seq`` by length."""
        return (seq.num_output_tokens + seq.num_pending_tokens >= seq.params.max_tokens
                or seq.num_tokens >= self.config.max_model_len)
