"""The seam between the shared core and the engines.

``ScheduledBatch`` is plain data the scheduler produces each step. ``build_attention_metadata``
is the one function that turns it into tensors; both runners call it, so a parity failure
between engines points at a model or a kernel, never at two readings of the batch.

Token layout: the tokens of all sequences are flattened, sequence after sequence. Sequence i
contributes ``query_lens[i]`` tokens at positions ``context_lens[i] - query_lens[i]`` ..
``context_lens[i] - 1``; after the step its first ``context_lens[i]`` tokens have K/V in the
cache. A decode is simply a sequence with query length 1; no flag distinguishes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from twinfer.device_copy import to_device_async
from twinfer.sequence import Sequence


@dataclass
class ScheduledBatch:
    """What to compute this step, in plain Python lists."""

    seqs: list[Sequence]
    input_ids: list[int]  # [num_tokens]
    positions: list[int]  # [num_tokens]
    query_lens: list[int]  # [num_seqs] tokens scheduled per sequence
    context_lens: list[int]  # [num_seqs] cached + scheduled tokens per sequence
    block_tables: list[list[int]]  # [num_seqs][blocks]
    slot_mapping: list[int]  # [num_tokens] cache slot for each token's new K/V
    logits_indices: list[int]  # rows of the flattened tokens that need logits
    sample_seq_indices: list[int]  # sequences that sample a token this step
    sample_logit_rows: list[int]  # for each of those, its row in the logits
    prompt_logprob_rows: dict[int, list[int]] = field(default_factory=dict)  # seq idx -> rows
    preempted: list[Sequence] = field(default_factory=list)
    # (token row, seq idx): input tokens the step in flight sampled, so far only on the device
    # (input_ids holds 0 there); the runner fills them from ``DeviceTokens``.
    pending_input_rows: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class AttentionMetadata:
    """Tensors every attention implementation needs, on the runner's device."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths
    context_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    logits_indices: torch.Tensor  # [num_logits] int64
    query_lens_cpu: list[int]  # host copies, so the reference loop needs no device sync
    context_lens_cpu: list[int]


@dataclass
class DeviceTokens:
    """Input tokens that so far exist only on the device: the step in flight sampled them."""

    token_ids: torch.Tensor  # int64 [num sampled] on the runner's device
    rows: list[int]  # token rows of this batch that take one of them
    sources: list[int]  # for each row, its index in token_ids

    def write_into(self, input_ids: torch.Tensor) -> None:
        """input_ids[rows] = token_ids[sources] on the device, without waiting for it."""
        n = len(self.rows)
        if self.rows == self.sources == list(range(n)):  # steady decode: same sequences, in order
            input_ids[:n].copy_(self.token_ids[:n], non_blocking=True)
            return
        index = to_device_async(torch.tensor([self.rows, self.sources], dtype=torch.long),
                                input_ids.device)
        input_ids.index_copy_(0, index[0], self.token_ids.index_select(0, index[1]))


def build_attention_metadata(batch: ScheduledBatch, device: torch.device | str
                             ) -> AttentionMetadata:
    """Turn a ScheduledBatch into device tensors (the only place this translation happens)."""
    max_blocks = max((len(t) for t in batch.block_tables), default=0)
    tables = [t + [0] * (max_blocks - len(t)) for t in batch.block_tables]
    query_start = [0]
    for q in batch.query_lens:
        query_start.append(query_start[-1] + q)

    def tensor(data, dtype):
        return torch.tensor(data, dtype=dtype).to(device, non_blocking=True)

    return AttentionMetadata(
        input_ids=tensor(batch.input_ids, torch.long),
        positions=tensor(batch.positions, torch.long),
        slot_mapping=tensor(batch.slot_mapping, torch.long),
        query_start_loc=tensor(query_start, torch.int32),
        context_lens=tensor(batch.context_lens, torch.int32),
        block_tables=tensor(tables, torch.int32).reshape(len(tables), max_blocks),
        logits_indices=tensor(batch.logits_indices, torch.long),
        query_lens_cpu=list(batch.query_lens),
        context_lens_cpu=list(batch.context_lens),
    )
