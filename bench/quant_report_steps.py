"""The steps of ``twinfer report`` (see ``bench.quant_report``), each computed once: quantize a
variant into ``DIR/checkpoints``, measure its accuracy against the base, time it per engine.

A checkpoint is reused when its directory has config.json (it is written to ``<name>.tmp`` and
renamed when complete, so an interrupted run leaves none); a result is reused when
``DIR/results/<step>-<hash>.json`` exists for the hash of every setting its numbers depend on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

QUANTIZE_LOG = "twinfer_report.json"  # in a checkpoint: how long quantizing it took


@dataclass(frozen=True)
class Variant:
    """A named quantization recipe; ``method`` None is the base model, unquantized."""

    name: str
    method: str | None
    bits: int = 16
    act_bits: int = 16
    per_channel: bool = False
    sym: bool = False


def check_group_size(model_cfg, group_size: int) -> None:
    """Every 4-bit linear's input size must be a multiple of the group size."""
    sizes = {model_cfg.hidden_size, model_cfg.intermediate_size,
             model_cfg.num_heads * model_cfg.head_dim}
    bad = sorted(k for k in sizes if k % group_size)
    if bad:
        raise ValueError(f"--group-size {group_size} does not divide the linears' input sizes "
                         f"{', '.join(map(str, bad))} of this model; choose a group size that "
                         f"divides {', '.join(map(str, sorted(sizes)))} (e.g. 64 or 32)")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class ReportSteps:
    """Runs (or reads back from the cache) the quantize / accuracy / speed steps of a report."""

    def __init__(self, args: argparse.Namespace, device: str, dtype: str):
        from twinfer.models import resolve_model

        self.args, self.out, self.device, self.dtype = args, Path(args.output_dir), device, dtype
        self.model_path = resolve_model(args.model)
        size = self.model_path.stat().st_size if self.model_path.is_file() else None
        self.model_id = {"path": str(self.model_path.resolve()), "size": size}
        self.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"--batch-sizes must list positive integers, got {args.batch_sizes!r}")
        self._base = self._text = self._bandwidth = None

    def checkpoint_dir(self, v: Variant) -> Path:
        a, calibrated = self.args, v.method != "rtn"
        key = {"model": self.model_id, "method": v.method, "scheme": self.scheme(v).name}
        if calibrated:
            calib = Path(a.calib).expanduser()
            key.update(calib=_file_digest(calib) if calib.is_file() else
                       f"{a.calib}@py{sys.version_info[:2]}", samples=a.calib_samples,
                       seqlen=a.calib_seqlen, seed=a.seed,
                       iters=a.iters if v.method == "autoround" else None)
        name = (f"{v.name}-g{'ch' if v.per_channel else a.group_size}-{_digest(key)}"
                + (f"-n{a.calib_samples}" if calibrated else ""))
        return self.out / "checkpoints" / name

    def model_of(self, v: Variant) -> str:
        return str(self.model_path if v.method is None else self.checkpoint_dir(v))

    def key(self, v: Variant, engine: str) -> dict:
        return {"model": self.model_id, "engine": engine, "dtype": self.dtype,
                "device": self.device,
                "checkpoint": self.checkpoint_dir(v).name if v.method else None}

    def cached(self, name: str, key: dict) -> tuple[Path, dict | None]:
        path = self.out / "results" / f"{name}-{_digest(key)}.json"
        return path, json.loads(path.read_text())["result"] if path.is_file() else None

    @staticmethod
    def save(path: Path, key: dict, result: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "result": result}, indent=1) + "\n")

    def scheme(self, v: Variant):
        from twinfer.quant import QuantScheme

        group = -1 if v.per_channel else self.args.group_size
        return QuantScheme(bits=v.bits, group_size=group, sym=v.sym, act_bits=v.act_bits)

    def llm(self, model: str, engine: str):
        """An LLM whose KV cache holds evaluation windows (and task prompts) and the largest
        speed batch; every one is built alike, so KL divergence pairs line up in batches."""
        from twinfer.llm import LLM

        a, max_bs = self.args, max(self.batch_sizes)
        total = a.input_len + a.output_len
        max_len = max(a.ctx, total, 2048 if a.tasks else 0)
        max_seqs = max(16, max_bs)
        batch_tokens = max(2048, max_seqs)
        blocks = max(-(-max_len // 16) + -(-batch_tokens // 16) + max_seqs,
                     max_bs * (-(-total // 16) + 1))
        return LLM(model, engine=engine, dtype=a.dtype, device=self.device, max_model_len=max_len,
                   max_num_seqs=max_seqs, max_num_batched_tokens=batch_tokens,
                   num_kv_blocks=blocks, enable_prefix_caching=False)

    def base(self, engine: str):
        if self._base is None:
            self._base = self.llm(str(self.model_path), engine)
        return self._base

    def text(self) -> str:
        if self._text is None:
            from twinfer.eval_data import load_text

            self._text = load_text(self.args.data)
        return self._text

    def check_group_size(self, variants: list[Variant], engine: str) -> None:
        """Fail on a group size the model's linears do not allow before any work is done."""
        if any(v.method and not v.per_channel and not (self.checkpoint_dir(v) / "config.json")
               .is_file() for v in variants):
            check_group_size(self.base(engine).engine.config.model, self.args.group_size)

    def quantize(self, v: Variant, engine: str) -> str:
        from quantize.cli import quantize_checkpoint
        from quantize.pipeline import QuantizeOptions

        final, a = self.checkpoint_dir(v), self.args
        if (final / "config.json").is_file():
            return "cached"
        options = QuantizeOptions(method=v.method, scheme=self.scheme(v), calib=a.calib,
                                  calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen,
                                  seed=a.seed, device=self.device)
        tmp = final.with_name(final.name + ".tmp")  # renamed when complete
        shutil.rmtree(tmp, ignore_errors=True)
        start = time.perf_counter()
        summary = quantize_checkpoint(str(self.model_path), tmp, options, iters=a.iters,
                                      progress=not a.no_progress)
        (tmp / QUANTIZE_LOG).write_text(json.dumps(
            {"format": summary.format, "seconds": time.perf_counter() - start,
             "bytes_before_16bit": summary.bytes_before, "bytes_after": summary.bytes_after}))
        tmp.rename(final)
        return "done"

    def accuracy(self, v: Variant, engine: str, slot: dict) -> tuple[str, dict]:
        from twinfer.evaluate import evaluate_tasks, kl_divergence

        a = self.args
        key = {**self.key(v, engine), "data": _digest(self.text()), "ctx": a.ctx,
               "max_windows": a.max_windows, "tasks_limit": a.tasks_limit,
               "tasks": [(t, _file_digest(Path(t))) for t in a.tasks]}
        path, result = self.cached(f"accuracy-{v.name}", key)
        if result is not None:
            return "cached", result
        base = self.base(engine)
        llm = slot["llm"] = self.llm(self.model_of(v), engine)  # speed reuses it
        result = {"engine": engine, **asdict(kl_divergence(llm, base, self.text(), a.ctx,
                                                           a.max_windows))}
        if a.tasks:
            result["tasks"] = [{k: x for k, x in asdict(t).items() if not k.startswith("correct")}
                               for t in evaluate_tasks(llm, a.tasks, a.tasks_limit)]
        if v.method is None:
            result["checkpoint_bytes"] = _params_16bit_bytes(llm.engine.runner.model)
        self.save(path, key, result)
        return "done", result

    def speed(self, v: Variant, engine: str, slot: dict) -> tuple[str, dict]:
        from bench.offline import copy_bandwidth

        a = self.args
        key = {**self.key(v, engine), "batch_sizes": self.batch_sizes, "seed": a.seed,
               "input_len": a.input_len, "output_len": a.output_len}
        path, result = self.cached(f"speed-{v.name}-{engine}", key)
        if result is not None:
            return "cached", result
        llm = slot.get("llm") if slot.get("engine") == engine else None
        llm = llm or self.llm(self.model_of(v), engine)
        if self.device.startswith("cuda") and self._bandwidth is None:
            self._bandwidth = copy_bandwidth(self.device)
        result = {"engine": engine, **_measure_speed(llm.engine, self.batch_sizes, a.input_len,
                                                     a.output_len, a.seed, self._bandwidth)}
        self.save(path, key, result)
        return "done", result


def _measure_speed(engine, batch_sizes: list[int], input_len: int, output_len: int, seed: int,
                   bandwidth: float | None) -> dict:
    """bench offline's protocol: per batch size, random prompts, a short warm-up, then one
    measured run; on CUDA the decode step against the copy-bandwidth roofline."""
    import random

    from bench.offline import kv_bytes_per_token, measure, weight_bytes_per_decode_step

    weight_bytes = weight_bytes_per_decode_step(engine.runner.model)
    kv_token = kv_bytes_per_token(engine)
    vocab = engine.config.model.vocab_size
    lo, hi = (100, min(vocab, 10000)) if vocab > 1000 else (2, vocab)
    rng, rows = random.Random(seed), []
    for bs in batch_sizes:
        prompts = [[[rng.randrange(lo, hi) for _ in range(input_len)] for _ in range(bs)]
                   for _ in range(2)]
        measure(engine, prompts[0], min(output_len, 4))
        row = measure(engine, prompts[1], output_len)
        step_bytes = weight_bytes + bs * (input_len + output_len / 2) * kv_token
        step = row["decode_step_s"]
        row["roofline_fraction"] = step_bytes / step / bandwidth if bandwidth and step else None
        rows.append(row)
    return {"weight_bytes_per_step": weight_bytes, "copy_bandwidth": bandwidth, "results": rows}


def _params_16bit_bytes(model) -> int:
    """The model's parameters at 2 bytes each: the size of its fp16 checkpoint."""
    from bench.offline import weight_bytes_per_decode_step

    tensor_bytes = weight_bytes_per_decode_step(model)
    embed = model.embed_tokens
    if model.lm_head is not embed:
        tensor_bytes += embed.numel() * embed.element_size()
    return tensor_bytes * 2 // embed.element_size()
