"""Quantization damage: perplexity, KL divergence against a base model, task accuracy.

Windows (perplexity and KL divergence), the GPTQ / AutoGPTQ / llama.cpp convention: the whole
text is tokenized once (with whatever special tokens the tokenizer adds, so a BOS only at its
start), cut into non-overlapping windows of ``ctx`` tokens (the tail shorter than ``ctx`` is
dropped), and each window is scored independently from an empty cache. Every position but a
window's first is a scored token: ``ctx - 1`` per window, predicted from the tokens before it in
the same window. ``ppl = exp(mean NLL)`` over all scored tokens.

KL divergence, as llama.cpp's ``--kl-divergence``: per scored token,
``KL(base || model) = sum_v p_base(v) (log p_base(v) - log p_model(v))`` in float64 from the
float32 log-softmax of both models on the same tokens.

Tasks, as lm-evaluation-harness scores multiple choice by log-likelihood: each choice's score is
the summed log-prob of its continuation tokens given the context; acc takes the argmax, acc_norm
the argmax of score / len(choice) in characters. Tokens of a continuation are those of
``context + continuation`` past the tokens of ``context`` (both without special tokens; a
trailing space of the context moves to the continuation). See ``twinfer/eval_data.py`` for the
prompts. Scoring goes through the engine's runner: see ``twinfer/eval_scoring.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from twinfer.engine import LLMEngine
from twinfer.eval_data import Task, load_task
from twinfer.eval_scoring import ScoreRequest, engine_of, iter_aligned, iter_logprobs


@dataclass
class PerplexityResult:
    ppl: float
    nll_mean: float  # mean negative log-likelihood per scored token, nats
    num_tokens: int  # scored tokens: num_windows * (ctx - 1)
    num_windows: int
    ctx: int


@dataclass
class KLDResult:
    kl_mean: float  # mean KL(base || model) per token, nats
    kl_median: float
    kl_p99: float
    kl_max: float
    same_top_rate: float  # fraction of tokens where both models' most likely token agrees
    num_tokens: int
    num_windows: int
    ctx: int
    ppl: float  # the evaluated model's perplexity on the same tokens
    ppl_base: float


@dataclass
class TaskResult:
    name: str
    path: str
    num_items: int
    acc: float
    acc_stderr: float
    acc_norm: float | None = None  # None where lm-eval reports none (BoolQ, WinoGrande, LAMBADA)
    acc_norm_stderr: float | None = None
    correct: list[bool] = field(default_factory=list, repr=False)  # per item, for acc
    correct_norm: list[bool] | None = field(default=None, repr=False)


# -- perplexity and KL divergence -------------------------------------------------------------


def _tokenize_text(engine: LLMEngine, text: str) -> torch.Tensor:
    # verbose=False: no "longer than the model's maximum" warning; the text is cut into windows
    ids = engine.tokenizer.hf.encode(text, add_special_tokens=True, verbose=False)
    return torch.tensor(ids, dtype=torch.long)


def _windows(tokens: torch.Tensor, ctx: int, max_windows: int | None) -> list[ScoreRequest]:
    if ctx < 2:
        raise ValueError(f"ctx must be at least 2, got {ctx}")
    n = len(tokens) // ctx
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be positive, got {max_windows}")
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {ctx}")
    return [ScoreRequest(tokens[i * ctx:(i + 1) * ctx].tolist()) for i in range(n)]


def _targets(tokens: torch.Tensor, ctx: int, idx: int, first: int, n: int,
             device: torch.device) -> torch.Tensor:
    """Token ids predicted by rows ``first .. first + n - 1`` of window ``idx``: [n, 1]."""
    start = idx * ctx + first + 1
    return tokens[start:start + n].to(device).unsqueeze(1)


def _window_bar(num_windows: int, progress: bool, desc: str) -> tqdm:
    return tqdm(total=num_windows, desc=desc, unit="window", disable=not progress)


def perplexity(llm, text: str, ctx: int = 2048, max_windows: int | None = None,
               max_batch_tokens: int | None = None, progress: bool = False) -> PerplexityResult:
    """Perplexity of ``llm`` (an LLM or LLMEngine) on ``text``, in windows of ``ctx`` tokens."""
    engine = engine_of(llm)
    tokens = _tokenize_text(engine, text)
    windows = _windows(tokens, ctx, max_windows)
    nll = 0.0
    with _window_bar(len(windows), progress, "perplexity") as bar, torch.inference_mode():
        for idx, first, lp in iter_logprobs(engine, windows, max_batch_tokens):
            target = _targets(tokens, ctx, idx, first, len(lp), lp.device)
            nll -= float(lp.gather(1, target).double().sum())
            bar.update(int(first + len(lp) == ctx - 1))
    num_tokens = len(windows) * (ctx - 1)
    nll_mean = nll / num_tokens
    return PerplexityResult(math.exp(nll_mean), nll_mean, num_tokens, len(windows), ctx)


def kl_divergence(llm, base_llm, text: str, ctx: int = 2048, max_windows: int | None = None,
                  max_batch_tokens: int | None = None, progress: bool = False) -> KLDResult:
    """KL(base || llm) per token over the perplexity windows of ``text``, plus both
    perplexities. Both models must share the tokenizer."""
    engine, base = engine_of(llm), engine_of(base_llm)
    tokens = _tokenize_text(engine, text)
    if not torch.equal(tokens, _tokenize_text(base, text)):
        raise ValueError("the model and the base model tokenize the text differently; KL "
                         "divergence needs the same tokenizer")
    windows = _windows(tokens, ctx, max_windows)
    # The same batch shapes for both, so pieces mostly line up (iter_aligned copes if not).
    batch_tokens = max_batch_tokens or min(engine.config.scheduler.max_num_batched_tokens,
                                           base.config.scheduler.max_num_batched_tokens)
    batch_seqs = min(engine.config.scheduler.max_num_seqs, base.config.scheduler.max_num_seqs)
    kls, nll, nll_base, same_top = [], 0.0, 0.0, 0
    with _window_bar(len(windows), progress, "KL divergence") as bar, torch.inference_mode():
        pieces = iter_aligned(iter_logprobs(engine, windows, batch_tokens, batch_seqs),
                              iter_logprobs(base, windows, batch_tokens, batch_seqs))
        for idx, first, lp, lp_base in pieces:
            lp_base = lp_base.to(lp.device)
            target = _targets(tokens, ctx, idx, first, len(lp), lp.device)
            nll -= float(lp.gather(1, target).double().sum())
            nll_base -= float(lp_base.gather(1, target).double().sum())
            same_top += int((lp.argmax(-1) == lp_base.argmax(-1)).sum())
            kls.append(_token_kl(lp_base, lp).cpu())
            bar.update(int(first + len(lp) == ctx - 1))
    kl = torch.cat(kls).numpy()
    n = len(kl)
    return KLDResult(kl_mean=float(kl.mean()), kl_median=float(np.median(kl)),
                     kl_p99=float(np.percentile(kl, 99)), kl_max=float(kl.max()),
                     same_top_rate=same_top / n, num_tokens=n, num_windows=len(windows),
                     ctx=ctx, ppl=math.exp(nll / n), ppl_base=math.exp(nll_base / n))


def _token_kl(lp_base: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """KL(base || model) per row of float32 log-probs [n, vocab], in float64: [n]."""
    rows = max(1, (1 << 23) // lp.shape[1])  # bound the float64 temporaries to ~64 MB each
    out = []
    for i in range(0, len(lp), rows):
        b = lp_base[i:i + rows].double()
        out.append((b.exp() * (b - lp[i:i + rows].double())).sum(-1))
    return torch.cat(out)


# -- tasks ----------------------------------------------------------------------------------


def evaluate_tasks(llm, task_files: list[str], limit: int | None = None,
                   max_batch_tokens: int | None = None,
                   progress: bool = False) -> list[TaskResult]:
    """Log-likelihood accuracy of ``llm`` on each task file (first ``limit`` items of each)."""
    engine = engine_of(llm)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    tasks = [load_task(path, limit) for path in task_files]  # every file checked before running
    return [_run_task(engine, task, max_batch_tokens, progress) for task in tasks]


def _run_task(engine: LLMEngine, task: Task, max_batch_tokens: int | None,
              progress: bool) -> TaskResult:
    encoder = _PairEncoder(engine)
    requests = [encoder.request(ctx, cont) for item in task.items for ctx, cont in item.pairs]
    loglik = [0.0] * len(requests)
    greedy = [True] * len(requests)
    with tqdm(total=len(requests), desc=task.name, unit="req", disable=not progress) as bar, \
            torch.inference_mode():
        for idx, first, lp in iter_logprobs(engine, requests, max_batch_tokens):
            ids = requests[idx].token_ids
            target = torch.tensor(ids[first + 1:first + 1 + len(lp)], device=lp.device)
            loglik[idx] += float(lp.gather(1, target.unsqueeze(1)).double().sum())
            greedy[idx] = greedy[idx] and bool((lp.argmax(-1) == target).all())
            bar.update(int(first + len(lp) == len(ids) - 1))
    correct, correct_norm, k = [], [], 0
    for item in task.items:
        lls = np.array(loglik[k:k + len(item.pairs)])
        if task.greedy:
            correct.append(all(greedy[k:k + len(item.pairs)]))
        else:
            correct.append(int(np.argmax(lls)) == item.gold)
        if item.choice_lengths is not None:
            correct_norm.append(int(np.argmax(lls / np.array(item.choice_lengths))) == item.gold)
        k += len(item.pairs)
    has_norm = len(correct_norm) == len(correct)
    acc, acc_stderr = _mean_stderr(correct)
    acc_norm, acc_norm_stderr = _mean_stderr(correct_norm) if has_norm else (None, None)
    return TaskResult(task.name, task.path, len(task.items), acc, acc_stderr, acc_norm,
                      acc_norm_stderr, correct, correct_norm if has_norm else None)


def _mean_stderr(hits: list[bool]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(n)), as lm-eval reports them."""
    n = len(hits)
    p = sum(hits) / n
    return p, math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0


class _PairEncoder:
    """lm-eval's (context, continuation) tokenization, left-truncating long contexts."""

    def __init__(self, engine: LLMEngine):
        self.tokenizer = engine.tokenizer
        self.max_len = engine.config.scheduler.max_model_len
        hf = engine.tokenizer.hf
        bos = hf.bos_token_id
        self.prefix_token = bos if bos is not None else engine.tokenizer.eos_token_ids[0]
        self._cache: dict[str, list[int]] = {}

    def _encode(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tokenizer.encode(text, add_special_tokens=False)
        return self._cache[text]

    def request(self, context: str, continuation: str) -> ScoreRequest:
        num_spaces = len(context) - len(context.rstrip())
        if num_spaces:
            context, continuation = context[:-num_spaces], context[-num_spaces:] + continuation
        ctx = self._encode(context) if context else []
        cont = self.tokenizer.encode(context + continuation, add_special_tokens=False)[len(ctx):]
        if not ctx:
            ctx = [self.prefix_token]
        if not cont:
            raise ValueError(f"continuation {continuation!r} has no tokens of its own")
        if len(ctx) + len(cont) > self.max_len:
            keep = self.max_len - len(cont)
            if keep < 1:
                raise ValueError(f"continuation of {len(cont)} tokens leaves no room for "
                                 f"context in max_model_len={self.max_len}")
            ctx = ctx[-keep:]
        return ScoreRequest(ctx + cont, first=len(ctx) - 1)
