"""Presentation of ``twinfer report``: the Pareto front, the recommendation, report.md and the
matplotlib plots (Agg backend, PNG), all from the report dict ``bench.quant_report`` builds.

Speed everywhere is decode tokens/s (batch size / mean decode-step time), the number a user
waits on; "batch 1" below means the smallest batch size measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.report import fmt, markdown_table

PPL_TOLERANCE = 1.05  # variants within 5% of fp16's perplexity count as accurate enough


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (speed, ppl) no other point beats on both counts (faster or as
    fast, and lower or equal ppl, one strictly), by increasing speed; of identical points, one."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], points[i][1]))
    front, best_ppl = [], float("inf")
    for i in order:  # fastest first: a point is on the front if it beats every faster one's ppl
        if points[i][1] < best_ppl:
            front.append(i)
            best_ppl = points[i][1]
    return front[::-1]


def speed_at(variant: dict, engine: str, batch_size: int) -> float | None:
    for row in variant["speed"].get(engine, {}).get("results", []):
        if row["batch_size"] == batch_size:
            return row["decode_tok_per_s"]
    return None


def _batch_sizes(report: dict) -> list[int]:
    return [int(b) for b in report["settings"]["batch_sizes"].split(",") if b.strip()]


def recommend(report: dict) -> dict:
    """The variant (and engine) for latency (smallest batch) and throughput (largest batch):
    the fastest whose ppl is within 5% of fp16's, else the one with the smallest ppl."""
    variants, base_ppl = report["variants"], report["variants"]["fp16"]["accuracy"]["ppl"]
    sizes = _batch_sizes(report)
    out = {}
    for kind, bs in (("latency", min(sizes)), ("throughput", max(sizes))):
        cands = [(speed_at(v, e, bs), name, e, v["accuracy"]["ppl"])
                 for name, v in variants.items() for e in report["engines"]
                 if speed_at(v, e, bs)]
        if not cands:
            out[kind] = {"variant": None, "engine": None, "reason": "no speed was measured"}
            continue
        ok = [c for c in cands if c[3] <= PPL_TOLERANCE * base_ppl]
        tok, name, engine, ppl = max(ok) if ok else min(cands, key=lambda c: c[3])
        base_tok = speed_at(variants["fp16"], engine, bs)
        vs = f" ({tok / base_tok:.2f}x fp16)" if base_tok else ""
        if ok:
            reason = (f"{name} decodes {tok:.1f} tok/s at batch {bs} on engine {engine}{vs}, the "
                      f"fastest of the {len({c[1] for c in ok})} variants whose perplexity is "
                      f"within 5% of fp16's ({ppl:.3f} vs {base_ppl:.3f})")
            quantized = [c for c in ok if c[1] != "fp16"]
            if name == "fp16" and quantized:
                q = max(quantized)
                reason += f"; the fastest quantized one, {q[1]}, reaches only {q[0]:.1f} tok/s"
        else:
            reason = (f"no variant stays within 5% of fp16's perplexity {base_ppl:.3f}; {name} "
                      f"loses the least ({ppl:.3f}, +{100 * (ppl / base_ppl - 1):.1f}%) and "
                      f"decodes {tok:.1f} tok/s at batch {bs} on engine {engine}{vs}")
        out[kind] = {"variant": name, "engine": engine, "batch_size": bs, "tok_per_s": tok,
                     "ppl": ppl, "reason": reason + "."}
    return out


# -- Markdown ---------------------------------------------------------------------------------


def build_markdown(report: dict) -> str:
    s, env, variants = report["settings"], report["environment"], report["variants"]
    fp16 = variants["fp16"]
    sizes = _batch_sizes(report)
    acc = fp16["accuracy"]
    lines = [f"# Quantization report: {report['model']}", "",
             f"- run: {env['date']}, {env['device']} ({env['device_name']}, {env['threads']} "
             f"threads, 1-min load average {' -> '.join(map(str, env['load_average_1min']))}), "
             f"torch {env['torch']}, commit {env.get('git_commit', '-')[:12]}, "
             f"{env['wall_s']:.0f} s (cached steps included)",
             f"- fp16 = the unquantized base model, run in {report['dtype']} on {env['device']} "
             f"(the compute dtype of every variant)",
             f"- accuracy: `{s['data']}`, {acc['num_windows']} windows of {s['ctx']} tokens "
             f"({acc['num_tokens']} scored), engine {report['accuracy_engine']}; KLD = "
             "KL(fp16 || variant) per token, nats",
             f"- speed: decode tok/s at batch sizes {s['batch_sizes']}, {s['input_len']}-token "
             f"random prompts, {s['output_len']} greedy output tokens; in parentheses: x fp16",
             f"- 4-bit: group size {s['group_size']}, asymmetric; calibration `{s['calib']}`, "
             f"{s['calib_samples']} samples x {s['calib_seqlen']} tokens, seed {s['seed']}"
             + (f", AutoRound {s['iters']} iterations" if "w4a16-autoround" in variants else "")]
    lines += [f"- note: {n}" for n in report["notes"]]
    headers = ["variant", "W/A bits", "checkpoint MB", "quantize s", "ppl", "ppl / fp16", "KLD mean",
               "KLD p99", "same top %"]
    headers += [f"{e} b{bs} tok/s" for e in report["engines"] for bs in sizes]
    rows = []
    for name, v in variants.items():
        a = v["accuracy"]
        row = [name, f"{v['weight_bits']}/{v['act_bits']}", _mb(v["checkpoint_bytes"]),
               fmt(v.get("quantize_s"), 0), f"{a['ppl']:.3f}", f"{a['ppl'] / acc['ppl']:.3f}", f"{a['kl_mean']:.4f}",
               f"{a['kl_p99']:.4f}", f"{100 * a['same_top_rate']:.2f}"]
        for e in report["engines"]:
            for bs in sizes:
                tok, base = speed_at(v, e, bs), speed_at(fp16, e, bs)
                row.append("-" if tok is None else f"{tok:.1f}" +
                           (f" ({tok / base:.2f}x)" if base else ""))
        rows.append(row)
    lines += ["", "## Results", "", markdown_table(headers, rows), "",
              "fp16's checkpoint MB is its parameters at 2 bytes each; the others are their "
              "model.safetensors (embeddings and lm_head stay fp16).", ""]
    lines += _speed_details(report) + _tasks(report)
    rec = report["recommendation"]
    lines += ["## Recommendation", "",
              f"- **Latency: {rec['latency']['variant']}** — {rec['latency']['reason']}",
              f"- **Throughput: {rec['throughput']['variant']}** — "
              f"{rec['throughput']['reason']}", "", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def _mb(num_bytes) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 1e6:.1f}"


def _speed_details(report: dict) -> list[str]:
    fp16, rows = report["variants"]["fp16"], []
    for name, v in report["variants"].items():
        for e, sp in v["speed"].items():
            for r in sp["results"]:
                base = speed_at(fp16, e, r["batch_size"])
                cuda_mem = r["peak_memory_bytes"] if "cuda" in r["peak_memory_kind"] else None
                rows.append([name, e, r["batch_size"], fmt(r["decode_tok_per_s"], 1),
                             fmt(r["decode_tok_per_s"] / base if base else None),
                             fmt(r["prefill_s"] * 1e3, 1),
                             fmt(r["decode_step_s"] and r["decode_step_s"] * 1e3, 1),
                             _mb(sp["weight_bytes_per_step"]), _mb(cuda_mem),
                             fmt(r["roofline_fraction"] and 100 * r["roofline_fraction"], 1)])
    table = markdown_table(["variant", "engine", "batch", "decode tok/s", "x fp16", "prefill ms",
                            "decode step ms", "weights MB/step", "peak MB", "roofline %"], rows)
    return ["## Speed", "", table, "",
            "weights MB/step: what one decode step reads of the weights (embedding rows aside) "
            "as the engine holds them: dense ones in the compute dtype, quantized codes one byte "
            "each in engine_torch (unpacked) plus float32 scales; peak MB (torch.cuda.max_memory_allocated) and roofline % "
            "(HBM copy bandwidth) on CUDA only.", ""]


def _tasks(report: dict) -> list[str]:
    rows = [[name, t["name"], t["num_items"], fmt(100 * t["acc"]),
             fmt(t["acc_norm"] and 100 * t["acc_norm"])]
            for name, v in report["variants"].items() for t in v["accuracy"].get("tasks", [])]
    if not rows:
        return []
    return ["## Tasks", "", markdown_table(["variant", "task", "items", "acc %", "acc_norm %"],
                                           rows), ""]


# -- plots ------------------------------------------------------------------------------------


def plot_all(report: dict, out_dir: Path) -> list[Path]:
    """Write the three PNGs into ``out_dir``; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, draw in (("accuracy_vs_speed.png", _accuracy_vs_speed),
                       ("size_memory.png", _size_memory),
                       ("speedup_vs_batch.png", _speedup_vs_batch)):
        fig, ax = plt.subplots(figsize=(7.5, 5), dpi=110)
        draw(ax, report)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        paths.append(out_dir / name)
    return paths


def _short(model: str) -> str:
    return Path(model).name or model


def _accuracy_vs_speed(ax, report: dict) -> None:
    bs = min(_batch_sizes(report))
    points, labels = [], []
    for name, v in report["variants"].items():
        for e in report["engines"]:
            tok = speed_at(v, e, bs)
            if tok:
                points.append((tok, v["accuracy"]["ppl"]))
                labels.append(name if len(report["engines"]) == 1 else f"{name} ({e})")
    for (x, y), label in zip(points, labels):
        ax.scatter(x, y, s=40, zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    front = [points[i] for i in pareto_front(points)]
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto front")
    base = report["variants"]["fp16"]["accuracy"]["ppl"]
    ax.axhline(PPL_TOLERANCE * base, color="tab:red", lw=0.8, ls=":", label="fp16 ppl + 5%")
    ax.set_xlabel(f"decode tokens/s at batch {bs} (higher is better)")
    ax.set_ylabel(f"perplexity, {report['settings']['data']} (lower is better)")
    ax.set_title(f"{_short(report['model'])}: accuracy vs speed")
    ax.legend(fontsize=8)


def _size_memory(ax, report: dict) -> None:
    names = list(report["variants"])
    first = report["engines"][0]
    series = {"checkpoint": [report["variants"][n]["checkpoint_bytes"] for n in names],
              f"weights read per decode step ({report['dtype']} compute, {first})":
              [report["variants"][n]["speed"].get(first, {}).get("weight_bytes_per_step")
               for n in names]}
    if report["environment"]["device"].startswith("cuda"):
        series["peak GPU memory (largest batch)"] = [
            max((r["peak_memory_bytes"] for r in report["variants"][n]["speed"].get(
                first, {}).get("results", [])), default=None) for n in names]
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
        mb = [(b or 0) / 1e6 for b in values]
        bars = ax.bar(xs, mb, width, label=label)
        ax.bar_label(bars, fmt="%.0f" if max(mb) >= 100 else "%.2g", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel("MB")
    ax.set_title(f"{_short(report['model'])}: size per variant")
    ax.legend(fontsize=8)


def _speedup_vs_batch(ax, report: dict) -> None:
    sizes, fp16 = _batch_sizes(report), report["variants"]["fp16"]
    styles = ["-", "--", ":"]
    for name, v in report["variants"].items():
        for k, e in enumerate(report["engines"]):
            pts = [(bs, speed_at(v, e, bs) / speed_at(fp16, e, bs)) for bs in sizes
                   if speed_at(v, e, bs) and speed_at(fp16, e, bs)]
            if pts:
                label = name if len(report["engines"]) == 1 else f"{name} ({e})"
                ax.plot(*zip(*pts), styles[k % 3], marker="o", label=label)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tok/s / fp16's (same engine)")
    ax.set_title(f"{_short(report['model'])}: speed-up over fp16")
    ax.legend(fontsize=8)
