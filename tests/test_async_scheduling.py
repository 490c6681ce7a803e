"""Asynchronous scheduling: step n + 1 is scheduled and launched before step n's sampled ids
reach the host. It must change when outputs arrive, never what they are."""

from __future__ import annotations

import random

import torch
from conftest import GREEDY, rand_tokens

from twinfer import LLM, SamplingParams
from twinfer.batch import DeviceTokens
from twinfer.config import SchedulerConfig
from twinfer.kv_cache import BlockManager
from twinfer.scheduler import Scheduler
from twinfer.sequence import Sequence


def mixed_requests(n: int) -> list[tuple[list[int], SamplingParams]]:
    """Length limits, stop tokens, stop strings and seeded sampling, in turn."""
    rng = random.Random(5)
    requests = []
    for i in range(n):
        prompt = rand_tokens(rng, rng.randint(1, 40))
        kind = i % 4
        if kind == 0:
            params = SamplingParams(max_tokens=rng.randint(1, 20), **GREEDY)
        elif kind == 1:
            params = SamplingParams(max_tokens=30, temperature=0.0,
                                    stop_token_ids=list(range(2, 40)))
        elif kind == 2:
            params = SamplingParams(max_tokens=25, temperature=0.0, stop=["w7"])
        else:
            params = SamplingParams(max_tokens=15, temperature=0.8, seed=i, ignore_eos=True)
        requests.append((prompt, params))
    return requests


def generate(model, engine: str, async_scheduling: bool, requests, **llm_kwargs):
    llm = LLM(model, engine=engine, max_model_len=128, async_scheduling=async_scheduling,
              **llm_kwargs)
    outs = llm.generate([p for p, _ in requests], [sp for _, sp in requests])
    return llm, [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
                 for o in outs]


def test_async_outputs_equal_sync_outputs(peaked_model, engine):
    requests = mixed_requests(16 if engine == "torch" else 8)  # fast: the interpreter is slow
    _, sync = generate(peaked_model, engine, False, requests, num_kv_blocks=64)
    llm, overlapped = generate(peaked_model, engine, True, requests, num_kv_blocks=64)
    assert overlapped == sync
    assert {reason for _, _, reason in sync} == {"length", "stop"}
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_async_under_preemption_equals_sync(peaked_model):
    rng = random.Random(0)
    requests = [(rand_tokens(rng, rng.randint(1, 60)),
                 SamplingParams(max_tokens=rng.randint(1, 40), **GREEDY)) for _ in range(48)]
    kwargs = dict(num_kv_blocks=16, max_num_seqs=48, enable_prefix_caching=False)
    _, sync = generate(peaked_model, "torch", False, requests, **kwargs)
    llm, overlapped = generate(peaked_model, "torch", True, requests, **kwargs)
    assert llm.engine.scheduler.num_preemptions > 0, "cache was not small enough to preempt"
    assert overlapped == sync
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_async_with_prefix_caching_equals_sync(peaked_model):
    rng = random.Random(2)
    prefix = rand_tokens(rng, 50)
    prompts = [prefix + rand_tokens(rng, 3) for _ in range(6)]
    params = SamplingParams(max_tokens=20, **GREEDY)
    runs = []
    for flag in (False, True):
        llm = LLM(peaked_model, engine="torch", max_model_len=128, num_kv_blocks=64,
                  async_scheduling=flag)
        first = llm.generate(prompts[:1], params)  # publishes the prefix's blocks
        rest = llm.generate(prompts[1:], params)
        assert all(o.num_cached_tokens == 48 for o in rest)
        runs.append([o.outputs[0].token_ids for o in first + rest])
    assert runs[1] == runs[0]


def test_penalties_and_logprobs_run_correctly_under_async(peaked_model):
    requests = [([5, 6, 7], SamplingParams(max_tokens=12, repetition_penalty=1.3, **GREEDY)),
                ([8, 9], SamplingParams(max_tokens=12, logprobs=2, **GREEDY)),
                ([10, 11, 12, 13], SamplingParams(max_tokens=12, prompt_logprobs=1, **GREEDY))]
    runs = []
    for flag in (False, True):
        llm = LLM(peaked_model, engine="torch", max_model_len=128, num_kv_blocks=64,
                  async_scheduling=flag)
        outs = llm.generate([p for p, _ in requests], [sp for _, sp in requests])
        runs.append([(o.outputs[0].token_ids, [sorted(e) for e in o.outputs[0].logprobs or []],
                      [sorted(e) if e else None for e in o.prompt_logprobs or []])
                     for o in outs])
    assert runs[1] == runs[0]


def test_async_step_returns_the_previous_steps_tokens(peaked_model):
    llm = LLM(peaked_model, engine="torch", max_model_len=128, num_kv_blocks=64,
              async_scheduling=True)
    eng = llm.engine
    eng.add_request("a", [3, 4, 5], SamplingParams(max_tokens=3, **GREEDY))
    assert eng.step() == []  # the prefill is launched; its token is not known yet
    counts = [len(eng.step()[0].outputs[0].token_ids) for _ in range(3)]
    assert counts == [1, 2, 3]
    assert eng.stats.num_steps == 3  # no step was spent past max_tokens
    assert not eng.has_unfinished_requests()


def test_abort_while_a_step_is_in_flight_frees_blocks(peaked_model):
    llm = LLM(peaked_model, engine="torch", max_model_len=128, num_kv_blocks=64,
              async_scheduling=True)
    eng = llm.engine
    eng.add_request("a", list(range(2, 50)), SamplingParams(max_tokens=100, **GREEDY))
    eng.step()
    eng.step()
    assert eng.abort_request("a")
    assert eng.block_manager.num_used_blocks == 0
    assert not eng.has_unfinished_requests()
    # The next step collects the aborted request's launched step and drops its token.
    outs = llm.generate([[7, 8, 9]], SamplingParams(max_tokens=2, **GREEDY))
    assert len(outs[0].outputs[0].token_ids) == 2
    assert eng.block_manager.num_used_blocks == 0


def test_scheduled_pending_token_is_marked_for_the_device():
    s = Scheduler(SchedulerConfig(max_model_len=64), BlockManager(8, 4))
    seq = Sequence("r", [5, 6, 7], SamplingParams(max_tokens=5))
    s.add(seq)
    s.advance(s.schedule())  # prefill launched: one token pending
    batch = s.schedule()
    assert batch.input_ids == [0] and batch.positions == [3]
    assert batch.pending_input_rows == [(0, 0)]
    assert seq.num_tokens == 4 and seq.token_ids == [5, 6, 7]


def test_sequence_at_its_length_limit_is_not_scheduled_while_its_token_is_pending():
    s = Scheduler(SchedulerConfig(max_model_len=64), BlockManager(8, 4))
    seq = Sequence("r", [5, 6, 7], SamplingParams(max_tokens=1))
    s.add(seq)
    first = s.schedule()
    s.advance(first)
    assert s.schedule().is_empty
    s.commit(first, [9])
    assert seq.is_finished and seq.status.value == "length" and seq.token_ids[-1] == 9


def test_device_tokens_fill_their_rows():
    sampled = torch.tensor([11, 12, 13])
    ids = torch.zeros(5, dtype=torch.long)
    DeviceTokens(sampled, rows=[0, 1, 2], sources=[0, 1, 2]).write_into(ids)
    assert ids.tolist() == [11, 12, 13, 0, 0]
    ids = torch.zeros(5, dtype=torch.long)
    DeviceTokens(sampled, rows=[1, 4], sources=[2, 0]).write_into(ids)
    assert ids.tolist() == [0, 13, 0, 0, 11]
