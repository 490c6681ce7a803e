"""Scheduler: budgets, FCFS, chunked prefill, preemption order, abort (plain Python)."""

from __future__ import annotations

import pytest

from twinfer.config import SchedulerConfig
from twinfer.kv_cache import BlockManager
from twinfer.sampling import SamplingParams
from twinfer.scheduler import Scheduler
from twinfer.sequence import Sequence, SequenceStatus


def make(num_blocks=16, block_size=4, **cfg) -> Scheduler:
    cfg = {"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": 64, **cfg}
    return Scheduler(SchedulerConfig(**cfg), BlockManager(num_blocks, block_size, False),
                     eos_token_ids=(1,))


def add(s: Scheduler, rid: str, n: int, max_tokens: int = 50) -> Sequence:
    seq = Sequence(rid, list(range(10, 10 + n)), SamplingParams(max_tokens=max_tokens),
                   arrival_index=len(s.waiting) + len(s.running))
    s.add(seq)
    return seq


def run_step(s: Scheduler, token: int = 7):
    batch = s.schedule()
    s.update(batch, [token] * len(batch.sample_seq_indices))
    return batch


def test_long_prompt_is_split_into_chunks_of_the_token_budget():
    s = make(max_num_batched_tokens=5)
    add(s, "a", 12)
    assert [run_step(s).query_lens for _ in range(3)] == [[5], [5], [2]]


def test_partial_prefill_chunk_samples_nothing():
    s = make(max_num_batched_tokens=5)
    add(s, "a", 12)
    batch = s.schedule()
    assert batch.sample_seq_indices == [] and batch.logits_indices == []


def test_max_num_seqs_caps_the_running_batch():
    s = make(max_num_seqs=2)
    for i in range(3):
        add(s, f"r{i}", 3)
    batch = run_step(s)
    assert [q.request_id for q in batch.seqs] == ["r0", "r1"]
    assert [q.request_id for q in s.waiting] == ["r2"]


def test_waiting_requests_are_admitted_in_arrival_order():
    s = make(num_blocks=3, block_size=4)
    add(s, "big", 8)  # needs 2 blocks
    add(s, "bigger", 8)  # would need 2 more: does not fit
    add(s, "small", 2)  # would fit, but must not overtake
    batch = s.schedule()
    assert [q.request_id for q in batch.seqs] == ["big"]


def test_newest_running_request_is_preempted_and_keeps_its_tokens():
    s = make(num_blocks=4, block_size=4)
    old, new = add(s, "old", 4), add(s, "new", 4)
    run_step(s)  # both prefilled (1 block each) and got a token: 5 tokens, need 2 blocks each
    run_step(s)  # decodes: 4 blocks in use
    assert s.block_manager.num_free_blocks == 0
    for _ in range(4):
        run_step(s)  # the 4th: old's position 8 needs a 3rd block, so new is preempted
    assert new.status is SequenceStatus.WAITING and new.num_preemptions == 1
    assert list(s.waiting) == [new] and new.block_table == [] and new.num_computed_tokens == 0
    assert new.num_output_tokens == 5  # the tokens it generated are kept for recompute
    assert old.status is SequenceStatus.RUNNING


def test_preempted_request_resumes_by_recomputing_all_its_tokens():
    s = make(num_blocks=4, block_size=4)
    old, new = add(s, "old", 4, max_tokens=8), add(s, "new", 4)
    while new.num_preemptions == 0:
        run_step(s)
    while old.status is SequenceStatus.RUNNING:
        run_step(s)
    batch = s.schedule()  # old finished and freed its blocks
    assert batch.seqs == [new] and batch.query_lens == [new.num_tokens]


def test_no_admission_in_a_step_that_preempted():
    s = make(num_blocks=4, block_size=4)
    add(s, "old", 4)
    add(s, "new", 4)
    for _ in range(2):
        run_step(s)
    add(s, "late", 1)
    for _ in range(10):
        batch = run_step(s)
        if batch.preempted:
            break
    assert batch.preempted, "the cache never ran out"
    assert all(q.request_id != "late" for q in batch.seqs)


def test_eos_and_max_tokens_finish_and_free():
    s = make()
    a, b = add(s, "a", 3, max_tokens=2), add(s, "b", 3)
    batch = s.schedule()
    s.update(batch, [7, 1])  # b samples eos
    assert b.status is SequenceStatus.FINISHED_STOPPED and b.block_table == []
    run_step(s)
    assert a.status is SequenceStatus.FINISHED_LENGTH
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_abort_a_waiting_request():
    s = make(max_num_seqs=1)
    add(s, "a", 3)
    add(s, "b", 3)
    run_step(s)
    assert s.abort("b").status is SequenceStatus.FINISHED_ABORTED
    assert s.abort("unknown") is None
    assert [q.request_id for q in s.waiting] == []


def test_prompt_over_max_model_len_is_refused():
    s = make(max_model_len=8)
    with pytest.raises(ValueError, match="max_model_len"):
        add(s, "a", 9)


def test_illegal_state_transition_raises():
    seq = Sequence("a", [1], SamplingParams())
    with pytest.raises(RuntimeError, match="illegal transition"):
        seq.set_status(SequenceStatus.WAITING)
