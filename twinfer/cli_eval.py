"""``twinfer eval ppl | kld | tasks``: quantization damage from the command line.

``register(subparsers)`` adds the ``eval`` command to twinfer's parser; ``run(args)`` runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from twinfer.cli import _add_engine_args, _llm_kwargs

_TASKS_MAX_MODEL_LEN = 2048  # lm-eval's default max_length


def register(subparsers) -> None:
    """Add ``eval`` with its ``ppl``, ``kld`` and ``tasks`` subcommands."""
    ev = subparsers.add_parser("eval", help="measure quantization damage: perplexity, KL "
                               "divergence against a base model, task accuracy")
    sub = ev.add_subparsers(dest="eval_command", required=True)
    ppl = sub.add_parser("ppl", help="perplexity over non-overlapping windows of a text")
    _add_engine_args(ppl)
    _add_text_args(ppl)
    kld = sub.add_parser("kld", help="KL divergence of MODEL from a base model, per token")
    _add_engine_args(kld)
    kld.add_argument("--base", required=True, help="the unquantized model to compare with "
                     "(same tokenizer); loaded with the same engine flags, its KV cache "
                     "in the model dtype (so --kv-cache-dtype int8 measures that cache's "
                     "damage)")
    _add_text_args(kld)
    tasks = sub.add_parser("tasks", help="multiple-choice log-likelihood accuracy")
    _add_engine_args(tasks)
    tasks.add_argument("--tasks", nargs="+", required=True, metavar="FILE",
                       help="task files: ARC / PIQA / BoolQ / WinoGrande / LAMBADA .jsonl, "
                       "HellaSwag .txt(.bz2) (see ../shared/data/eval)")
    tasks.add_argument("--limit", type=int, default=None, help="first N items of each task")
    for p in (ppl, kld, tasks):
        p.add_argument("--json", default=None, metavar="FILE", help="also write results here")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_text_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="wikitext2",
                   help="'wikitext2' (../shared/data, joined as GPTQ does), a .txt file, or a "
                   ".jsonl of {\"text\"} rows")
    p.add_argument("--ctx", type=int, default=2048, help="tokens per window")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N")


def run(args: argparse.Namespace) -> int:
    """Run the ``eval`` subcommand in ``args``; the exit status."""
    try:
        result = {"ppl": _run_ppl, "kld": _run_kld, "tasks": _run_tasks}[args.eval_command](args)
    except FileNotFoundError as e:
        print(f"twinfer: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


def _make_llm(args: argparse.Namespace, model: str, max_model_len: int | None,
              **overrides):
    """An LLM whose KV cache holds what evaluation needs, so two fit on one GPU (kld)."""
    from twinfer.llm import LLM

    max_len = args.max_model_len or max_model_len
    num_blocks = args.num_kv_blocks
    if num_blocks is None and max_len is not None:
        batch_tokens = args.max_num_batched_tokens or max(2048, args.max_num_seqs)
        # one request up to max_len in flight + a batch of packed ones + partial blocks
        num_blocks = -(-max_len // 16) + -(-batch_tokens // 16) + args.max_num_seqs
    return LLM(model, **{**_llm_kwargs(args), "max_model_len": max_len,
                         "num_kv_blocks": num_blocks, **overrides})


def _run_ppl(args: argparse.Namespace) -> dict:
    from twinfer.eval_data import load_text
    from twinfer.evaluate import perplexity

    text = load_text(args.data)
    llm = _make_llm(args, args.model, args.ctx)
    r = perplexity(llm, text, args.ctx, args.max_windows, progress=not args.no_progress)
    _print_rows([("model", args.model), ("data", args.data), ("ctx", r.ctx),
                 ("windows", r.num_windows), ("scored tokens", r.num_tokens),
                 ("mean NLL", f"{r.nll_mean:.6f}"), ("perplexity", f"{r.ppl:.4f}")])
    return {"command": "ppl", "model": args.model, "data": args.data, **asdict(r)}


def _run_kld(args: argparse.Namespace) -> dict:
    from twinfer.eval_data import load_text
    from twinfer.evaluate import kl_divergence

    text = load_text(args.data)
    llm = _make_llm(args, args.model, args.ctx)
    base = _make_llm(args, args.base, args.ctx, kv_cache_dtype="auto")
    r = kl_divergence(llm, base, text, args.ctx, args.max_windows,
                      progress=not args.no_progress)
    _print_rows([("model", args.model), ("base", args.base), ("data", args.data),
                 ("ctx", r.ctx), ("windows", r.num_windows), ("scored tokens", r.num_tokens),
                 ("perplexity", f"{r.ppl:.4f}"), ("base perplexity", f"{r.ppl_base:.4f}"),
                 ("mean KL", f"{r.kl_mean:.6f}"), ("median KL", f"{r.kl_median:.6f}"),
                 ("99th pct KL", f"{r.kl_p99:.6f}"), ("max KL", f"{r.kl_max:.6f}"),
                 ("same top token", f"{100 * r.same_top_rate:.3f} %")])
    return {"command": "kld", "model": args.model, "base": args.base, "data": args.data,
            **asdict(r)}


def _run_tasks(args: argparse.Namespace) -> dict:
    from twinfer.eval_data import load_task
    from twinfer.evaluate import evaluate_tasks

    for path in args.tasks:  # fail on a bad file before loading the model
        load_task(path, limit=1)
    llm = _make_llm(args, args.model, _TASKS_MAX_MODEL_LEN)
    results = evaluate_tasks(llm, args.tasks, args.limit, progress=not args.no_progress)

    def pct(value, err):
        return "-" if value is None else f"{100 * value:.2f} ± {100 * err:.2f}"

    width = max(len("task"), *(len(r.name) for r in results))
    print(f"{'task':<{width}}  {'items':>6}  {'acc %':>14}  {'acc_norm %':>14}")
    for r in results:
        print(f"{r.name:<{width}}  {r.num_items:>6}  {pct(r.acc, r.acc_stderr):>14}  "
              f"{pct(r.acc_norm, r.acc_norm_stderr):>14}")
    return {"command": "tasks", "model": args.model, "limit": args.limit,
            "results": [asdict(r) for r in results]}


def _print_rows(rows: list[tuple[str, object]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
