"""Engine-level latency and throughput, no HTTP: ``twinfer.llm.LLM``'s engine stepped directly.

    twinfer bench offline MODEL [--engine auto|torch|fast] [--dtype ...] [--device ...]
                          [--batch-sizes 1,8,64,256] [--input-len 128] [--output-len 128] [-o DIR]

Per batch size B: B random token-id prompts of ``input_len`` tokens are added at once and run
to exactly ``output_len`` tokens each (greedy, ``ignore_eos``). Measured:

    prefill time      start -> the step after which every sequence has its first token
    decode step time  mean wall time of the steps after that (each one token per sequence)
    output tok/s      B x output_len / wall time

On CUDA the decode step is set against the HBM roofline: a step reads every weight the model
holds except the embedding table (the lm_head is read whole, the embedding only by row) plus
each sequence's K/V, so ``bytes / copy bandwidth`` is its least possible time, with the
device-to-device copy bandwidth measured at the start of the same run. The mean context of a
decode step is ``input_len + output_len / 2``.

The KV cache is sized to the largest batch (no preemption) unless ``--num-kv-blocks`` is given;
prefix caching is off, so no batch reuses another's prefill.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time

import torch

from bench.report import environment, fmt, markdown_table, write_json


def add_offline_args(p: argparse.ArgumentParser) -> None:
    from twinfer.cli import _add_engine_args

    _add_engine_args(p)
    p.add_argument("--batch-sizes", default="1,8,64,256")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-warmups", type=int, default=1,
                   help="short runs per batch size before measuring (JIT, autotuning)")
    p.add_argument("-o", "--output-dir", default="bench-results")


def run(args: argparse.Namespace) -> int:
    from twinfer.cli import _llm_kwargs
    from twinfer.config import resolve_device
    from twinfer.llm import LLM

    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must list positive integers, got {args.batch_sizes!r}")
    if args.input_len < 1 or args.output_len < 1:
        raise ValueError("--input-len and --output-len must be at least 1")
    device = resolve_device(args.device)
    bandwidth = copy_bandwidth(device) if device.startswith("cuda") else None
    total_len = args.input_len + args.output_len
    max_bs = max(batch_sizes)
    llm = LLM(args.model, **{**_llm_kwargs(args), "device": device, "max_num_seqs": max_bs,
                             "max_model_len": args.max_model_len or total_len,
                             "num_kv_blocks": args.num_kv_blocks
                             or max_bs * (-(-total_len // 16) + 1),
                             "enable_prefix_caching": False})
    engine = llm.engine
    weight_bytes = weight_bytes_per_decode_step(engine.runner.model)
    kv_token_bytes = kv_bytes_per_token(engine)
    vocab = engine.config.model.vocab_size
    token_range = (100, min(vocab, 10000)) if vocab > 1000 else (2, vocab)
    rng = random.Random(args.seed)
    rows = []
    for bs in batch_sizes:
        for _ in range(args.num_warmups):
            measure(engine, _prompts(rng, bs, args.input_len, token_range),
                    min(args.output_len, 4))
        row = measure(engine, _prompts(rng, bs, args.input_len, token_range), args.output_len)
        mean_context = args.input_len + args.output_len / 2
        row["decode_bytes_per_step"] = weight_bytes + bs * mean_context * kv_token_bytes
        row.update(_roofline(row, bandwidth))
        rows.append(row)
    config = engine.config
    payload = {"kind": "offline", "model": str(args.model), "engine": config.engine,
               "dtype": str(config.dtype).removeprefix("torch."), "device": config.device,
               "device_name": _device_name(config.device), "input_len": args.input_len,
               "output_len": args.output_len, "weight_bytes_per_step": weight_bytes,
               "kv_bytes_per_token": kv_token_bytes, "copy_bandwidth": bandwidth,
               "environment": {**environment(), "torch": torch.__version__,
                               "threads": torch.get_num_threads()},
               "results": rows}
    print(format_report(payload))
    path = write_json(args.output_dir, "offline", llm.model_path.name, payload)
    print(f"\nwrote {path}")
    return 0


def _prompts(rng: random.Random, n: int, length: int, token_range: tuple[int, int]
             ) -> list[list[int]]:
    return [[rng.randrange(*token_range) for _ in range(length)] for _ in range(n)]


def measure(engine, prompts: list[list[int]], output_len: int) -> dict:
    """Run ``prompts`` as one batch to ``output_len`` tokens each; timings and memory."""
    from twinfer.sampling import SamplingParams

    device = engine.config.device
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ids = [f"bench-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    without_token = set(ids)
    prefill_s, decode_steps, num_tokens = None, [], 0
    start = time.perf_counter()
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    while engine.has_unfinished_requests():
        step_start = time.perf_counter()
        # Returns once a step's tokens are on the host (with async scheduling, the previous
        # step's, after launching the next): in steady state one call per step period.
        outputs = engine.step()
        now = time.perf_counter()
        if prefill_s is not None:
            decode_steps.append(now - step_start)
        for out in outputs:
            without_token.discard(out.request_id)
            if out.finished:
                num_tokens += len(out.outputs[0].token_ids)
        if prefill_s is None and not without_token:
            prefill_s = now - start
    wall = time.perf_counter() - start
    decode_s = sum(decode_steps) / len(decode_steps) if decode_steps else None
    bs = len(prompts)
    return {"batch_size": bs, "wall_s": wall, "prefill_s": prefill_s,
            "num_decode_steps": len(decode_steps), "decode_step_s": decode_s,
            "output_tokens": num_tokens, "output_tok_per_s": num_tokens / wall,
            "prefill_tok_per_s": bs * len(prompts[0]) / prefill_s,
            "decode_tok_per_s": bs / decode_s if decode_s else None,
            **_peak_memory(device)}


def _peak_memory(device: str) -> dict:
    if device.startswith("cuda"):
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device),
                "peak_memory_kind": "torch.cuda.max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, bytes on macOS; it is the process's peak so far.
    return {"peak_memory_bytes": rss if sys.platform == "darwin" else rss * 1024,
            "peak_memory_kind": "process peak RSS"}


def _roofline(row: dict, bandwidth: float | None) -> dict:
    step = row["decode_step_s"]
    if not step:
        return {"decode_bytes_per_s": None, "roofline_fraction": None}
    achieved = row["decode_bytes_per_step"] / step
    return {"decode_bytes_per_s": achieved,
            "roofline_fraction": achieved / bandwidth if bandwidth else None}


def copy_bandwidth(device: str, num_bytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, read and write counted (as bench.fast_roofline)."""
    x = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize(device)
    seconds = begin.elapsed_time(end) * 1e-3
    del x, y
    torch.cuda.empty_cache()
    return 2 * num_bytes * iters / seconds


def weight_bytes_per_decode_step(model) -> int:
    """Bytes of the tensors a decode step reads whole: every layer's (whatever objects hold
    them: dense or quantized linears, norms), the final norm and the lm_head, once each. The
    embedding table is left out unless tied to the lm_head: a decode reads one row of it."""
    seen: set[int] = set()
    total = 0
    stack = [model.layers, model.norm, model.lm_head]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif hasattr(obj, "__dict__"):  # dataclasses and linear containers
            stack.extend(vars(obj).values())
    return total


def kv_bytes_per_token(engine) -> float:
    """K and V bytes one token position takes across all layers, from the allocated cache."""
    caches = engine.runner.kv_caches
    tensors = [t for pair in caches for c in pair
               for t in ((c,) if isinstance(c, torch.Tensor) else c.tensors())]
    total = sum(t.numel() * t.element_size() for t in tensors)
    return total / (engine.block_manager.num_blocks * engine.config.cache.block_size)


def _device_name(device: str) -> str:
    import platform

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def format_report(payload: dict) -> str:
    head = (f"model: {payload['model']}  engine: {payload['engine']}  dtype: {payload['dtype']}"
            f"  device: {payload['device']} ({payload['device_name']})  input/output: "
            f"{payload['input_len']}/{payload['output_len']}")
    if payload["copy_bandwidth"]:
        head += f"  copy bandwidth: {payload['copy_bandwidth'] / 1e9:.0f} GB/s"
    rows = [[r["batch_size"], r["wall_s"], fmt(r["prefill_s"] * 1e3, 1),
             fmt(r["decode_step_s"] * 1e3 if r["decode_step_s"] else None, 2),
             fmt(r["output_tok_per_s"], 1),
             fmt(r["decode_bytes_per_s"] / 1e9 if r["decode_bytes_per_s"] else None, 1),
             fmt(r["roofline_fraction"] * 100 if r["roofline_fraction"] else None, 1),
             fmt(r["peak_memory_bytes"] / 2**30, 2)] for r in payload["results"]]
    table = markdown_table(["batch", "wall s", "prefill ms", "decode step ms", "output tok/s",
                            "decode GB/s", "roofline %", "peak GiB"], rows)
    return f"{head}\n\n{table}"
