"""LLMEngine: add_request / step / abort over one scheduler, one runner and one sampler.

    step():  batch = scheduler.schedule()          which tokens of which sequences
             logits = runner.execute(batch)         engine_torch or engine_fast
             sampled = sampler.sample(logits, ...)  shared; ids stay on the device
             scheduler.advance(batch)               tokens computed, one pending token each
             ... sampled.resolve()                  ids to the host
             scheduler.commit(batch, ids)           append, token stops, free finished
             detokenize, stop strings, outputs

Asynchronous scheduling (``EngineConfig.async_scheduling``, on by default on CUDA) overlaps
the host's work with the device's, as vLLM's and SGLang's schedulers do: step n + 1 is
scheduled and launched while step n still runs, its decode inputs taken on the device from step
n's sampled ids, and only then does the host wait for step n's ids and turn them into outputs.
So ``step`` returns the outputs of the step before the one it launched. The cost: a sequence
that stopped at step n (EOS, stop string) also ran in step n + 1, whose token is discarded.
Steps whose sampling reads the token history (penalties) or that return prompt logprobs run
synchronously.

Input is validated in ``add_request`` before anything is queued, so a bad request raises
there and never disturbs the requests already in flight.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from twinfer.batch import DeviceTokens, ScheduledBatch
from twinfer.config import EngineConfig
from twinfer.kv_cache import BlockManager
from twinfer.kv_cache_memory import determine_num_kv_blocks
from twinfer.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from twinfer.registry import Runner, create_runner
from twinfer.sampling import SampledTokens, Sampler, SamplerInput, SamplingParams
from twinfer.scheduler import Scheduler
from twinfer.sequence import Sequence, SequenceStatus
from twinfer.tokenizer import IncrementalDetokenizer, Tokenizer, find_stop_string
from twinfer.weights import ModelWeights


@dataclass
class EngineStats:
    """Running totals since the engine started."""

    num_steps: int = 0
    num_scheduled_tokens: int = 0  # tokens run through the model (prefill chunks + decodes)
    num_generated_tokens: int = 0


@dataclass
class _RequestState:
    seq: Sequence
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    stop_string: str | None = None  # set when a stop string ended the request
    cumulative_logprob: float = 0.0


@dataclass
class _LaunchedStep:
    """A step on the device whose sampled ids the host has not read yet."""

    batch: ScheduledBatch
    logits: torch.Tensor
    sample_seqs: list[Sequence]
    sampled: SampledTokens
    sample_index: dict[int, int]  # id(seq) -> its row in sampled.token_ids
    must_complete: bool  # the next step cannot be scheduled before this one's ids are known


class LLMEngine:
    """Owns the scheduler, the runner and the sampler; advances all requests one step at a time."""

    def __init__(self, config: EngineConfig, weights: ModelWeights | None, tokenizer: Tokenizer,
                 runner: Runner | None = None):
        """``runner`` replaces the one ``config.engine`` names (``weights`` may then be None):
        benchmarks of the host-side work use a runner that computes nothing."""
        self.config = config
        self.tokenizer = tokenizer
        self.runner = runner if runner is not None else create_runner(config, weights)
        num_blocks = determine_num_kv_blocks(config.model, config.cache, config.dtype,
                                             config.device)
        block_size = config.cache.block_size
        needed = -(-config.scheduler.max_model_len // block_size)
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache fits {num_blocks} blocks of {block_size} tokens, fewer than the "
                f"{needed} one sequence of max_model_len={config.scheduler.max_model_len} needs; "
                "lower max_model_len or give the cache more memory")
        self.runner.allocate_kv_cache(num_blocks)
        self.block_manager = BlockManager(num_blocks, block_size,
                                          config.cache.enable_prefix_caching)
        eos = tuple(sorted(set(tokenizer.eos_token_ids) | set(config.model.eos_token_ids)))
        self.scheduler = Scheduler(config.scheduler, self.block_manager, eos)
        self.sampler = Sampler()
        self._requests: dict[str, _RequestState] = {}
        self._arrivals = itertools.count()
        self.stats = EngineStats()
        self._in_flight: _LaunchedStep | None = None

    # -- requests ---------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None,
                    prompt_text: str | None = None) -> Sequence:
        """Queue a request; raises ValueError (naming the problem) and queues nothing if bad.
        ``prompt_text``: the text that token-id ``prompt`` came from, reported back in the
        outputs (a text prompt reports itself)."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_text = prompt if isinstance(prompt, str) else prompt_text
        token_ids = self.encode_prompt(prompt)
        max_len = self.config.scheduler.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; max_model_len is {max_len}, "
                             "which must leave room for at least one generated token")
        seq = Sequence(request_id, token_ids, params, arrival_index=next(self._arrivals))
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.config.device).manual_seed(params.seed)
        detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
        self.scheduler.add(seq)
        self._requests[request_id] = _RequestState(seq, prompt_text, detok)
        return seq

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a text prompt, or checked token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            token_ids = list(prompt)
            vocab = self.config.model.vocab_size
            bad = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, int)
                   or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token ids must be ints in [0, {vocab}); got {bad[0]!r}")
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got "
                             f"{type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt is empty")
        return token_ids

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False if it is unknown or already finished."""
        state = self._requests.pop(request_id, None)
        if state is None or state.seq.is_finished:
            return False
        self.scheduler.abort(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        # A step still in flight holds only sequences the scheduler also holds, unless they
        # all finished meanwhile (then its tokens are dropped by the next step, unread).
        return self.scheduler.num_unfinished > 0

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; outputs of every request that got a token. With
        asynchronous scheduling the batch is only launched, and the outputs are those of the
        step launched before it."""
        previous, self._in_flight = self._in_flight, None
        batch = self.scheduler.schedule()
        launched = None if batch.is_empty else self._launch(batch, previous)
        outputs = self._complete(previous) if previous is not None else []
        if launched is not None:
            if self.config.async_scheduling and not launched.must_complete:
                self._in_flight = launched
            else:
                outputs += self._complete(launched)
        return outputs

    def _launch(self, batch: ScheduledBatch, previous: _LaunchedStep | None) -> _LaunchedStep:
        """Queue the batch's forward pass and sampling on the device; nothing waits for it."""
        device_tokens = None
        if batch.pending_input_rows:  # decodes of tokens the previous step sampled
            device_tokens = DeviceTokens(
                previous.sampled.token_ids, [row for row, _ in batch.pending_input_rows],
                [previous.sample_index[id(batch.seqs[i])] for _, i in batch.pending_input_rows])
        logits = self.runner.execute(batch, device_tokens)
        sample_seqs = [batch.seqs[i] for i in batch.sample_seq_indices]
        rows = batch.sample_logit_rows
        sample_logits = logits if rows == list(range(logits.shape[0])) else logits[rows]
        # Token histories are copies (output_token_ids slices): only penalties read them.
        history = any(s.params.uses_penalties for s in sample_seqs)
        sampled = self.sampler.sample(sample_logits, SamplerInput(
            params=[s.params for s in sample_seqs],
            generators=[s.generator for s in sample_seqs],
            prompt_token_ids=[s.prompt_token_ids if history else [] for s in sample_seqs],
            output_token_ids=[s.output_token_ids if history else [] for s in sample_seqs]))
        self.scheduler.advance(batch)
        self.stats.num_steps += 1
        self.stats.num_scheduled_tokens += batch.num_tokens
        return _LaunchedStep(batch, logits, sample_seqs, sampled,
                             {id(s): i for i, s in enumerate(sample_seqs)},
                             must_complete=history or bool(batch.prompt_logprob_rows))

    def _complete(self, step: _LaunchedStep) -> list[RequestOutput]:
        """Wait for the step's sampled ids, commit them and build the outputs."""
        sampled = step.sampled.resolve()
        self._record_prompt_logprobs(step.batch, step.logits)
        # A sequence finished meanwhile (aborted, or stopped by its previous token) drops its.
        live = [(seq, token, lp) for seq, token, lp
                in zip(step.sample_seqs, sampled.token_ids, sampled.logprobs)
                if not seq.is_finished]
        self.stats.num_generated_tokens += len(live)
        stop_hits = {seq.request_id: self._detokenize(seq, token, lp) for seq, token, lp in live}
        self.scheduler.commit(step.batch, sampled.token_ids)
        outputs = []
        for seq, _, _ in live:
            if stop_hits[seq.request_id] and not seq.is_finished:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
            outputs.append(self._make_output(self._requests[seq.request_id]))
            if seq.is_finished:
                del self._requests[seq.request_id]
        return outputs

    def _detokenize(self, seq: Sequence, token: int, logprob) -> bool:
        """Add the token's text and logprobs; True when a stop string appeared."""
        state = self._requests[seq.request_id]
        if logprob is not None:
            entry = self._logprob_entry(token, *logprob)
            seq.output_logprobs.append(entry)
            state.cumulative_logprob += logprob[0]
        if state.stop_string is not None:
            return True
        delta = state.detokenizer.add(token)
        stop = seq.params.stop
        cut = find_stop_string(state.detokenizer.text, stop, len(delta)) if delta else None
        if cut is None:
            return False
        text = state.detokenizer.text
        state.stop_string = next(s for s in stop if text.startswith(s, cut))
        state.detokenizer.text = text[:cut]
        return True

    def _logprob_entry(self, token: int, token_logprob: float, top_ids: list[int],
                       top_values: list[float]) -> TokenLogprobs:
        entry = {tid: Logprob(v, rank=r + 1, decoded_token=self.tokenizer.decode([tid], False))
                 for r, (tid, v) in enumerate(zip(top_ids, top_values))}
        if token not in entry:
            entry[token] = Logprob(token_logprob, rank=None,
                                   decoded_token=self.tokenizer.decode([token], False))
        return entry

    def _record_prompt_logprobs(self, batch: ScheduledBatch, logits: torch.Tensor) -> None:
        for idx, rows in batch.prompt_logprob_rows.items():
            seq = batch.seqs[idx]
            logprobs = torch.log_softmax(logits[rows], dim=-1)
            n = seq.params.prompt_logprobs
            first = len(seq.prompt_logprobs)  # position p predicts token p + 1
            for r in range(len(rows)):
                target = seq.token_ids[first + r + 1]
                row = logprobs[r]
                top = torch.topk(row, n) if n else None
                entry = self._logprob_entry(
                    target, float(row[target]),
                    top.indices.tolist() if top is not None else [],
                    top.values.tolist() if top is not None else [])
                seq.prompt_logprobs.append(entry)

    def _make_output(self, state: _RequestState) -> RequestOutput:
        seq = state.seq
        finished = seq.is_finished
        finish = None
        if finished:
            finish = "stop" if state.stop_string is not None else seq.status.value
        stop_reason = state.stop_string
        if finish == "stop" and stop_reason is None and seq.token_ids[-1] in \
                seq.params.stop_token_ids:
            stop_reason = seq.token_ids[-1]
        want_lp = seq.params.logprobs is not None
        text = state.detokenizer.text
        if not finished and seq.params.stop:
            # Hold back a tail that could still become a stop string, so streamed text is
            # always a prefix of the final text.
            hold = max(len(s) for s in seq.params.stop) - 1
            text = text[:max(len(text) - hold, 0)]
        completion = CompletionOutput(
            index=0, text=text, token_ids=seq.output_token_ids,  # a fresh slice: no copy
            cumulative_logprob=state.cumulative_logprob if want_lp else None,
            logprobs=list(seq.output_logprobs) if want_lp else None,
            finish_reason=finish, stop_reason=stop_reason)
        prompt_lp = None
        if seq.params.prompt_logprobs is not None:
            prompt_lp = [None] + list(seq.prompt_logprobs)
        return RequestOutput(request_id=seq.request_id, prompt=state.prompt,
                             prompt_token_ids=seq.prompt_token_ids, outputs=[completion],
                             finished=finished, prompt_logprobs=prompt_lp,
                             num_cached_tokens=seq.num_cached_tokens)
