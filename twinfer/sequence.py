"""Sequence: one request's tokens, progress and state.

State machine (illegal transitions raise):
    WAITING -> RUNNING            admitted by the scheduler
    RUNNING -> WAITING            preempted (blocks freed; recomputed from scratch later)
    WAITING | RUNNING -> FINISHED_*   stopped, length reached, or aborted
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from twinfer.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
                       SequenceStatus.FINISHED_ABORTED})


_ALLOWED = {
    SequenceStatus.WAITING: {SequenceStatus.RUNNING},
    SequenceStatus.RUNNING: {SequenceStatus.WAITING},
}


@dataclass(eq=False)
class Sequence:
    """A request in flight. ``token_ids`` is prompt + output; the first ``num_computed_tokens``
    of them have K/V in the cache blocks listed by ``block_table``.

    With asynchronous scheduling a sampled token can exist only on the device for one step:
    ``num_pending_tokens`` counts such tokens after ``token_ids`` (they are scheduled and
    computed like any other, and appended when the step that sampled them completes)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_index: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hash chain of full blocks
    num_published_blocks: int = 0  # leading blocks already offered to the prefix cache
    num_preemptions: int = 0
    num_pending_tokens: int = 0
    generator: torch.Generator | None = None
    prompt_logprobs: list = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Known tokens plus those still pending on the device."""
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def set_status(self, status: SequenceStatus) -> None:
        """Move to ``status``; raises on a transition the state machine does not allow."""
        if status.is_finished:
            if self.status.is_finished:
                raise RuntimeError(f"request {self.request_id} already finished")
        elif status not in _ALLOWED.get(self.status, ()):
            raise RuntimeError(
                f"request {self.request_id}: illegal transition {self.status.name} -> "
                f"{status.name}")
        self.status = status
