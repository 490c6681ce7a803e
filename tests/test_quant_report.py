"""twinfer report: every variant measured, fp16 against itself is exact, plots and the
recommendation exist, reruns come from the cache, bad input is named."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import pytest

from bench.quant_report import parse_variants
from bench.quant_report_plots import pareto_front
from bench.quant_report_steps import check_group_size
from twinfer.cli import main as cli_main

VARIANTS = ["fp16", "w8a16", "w4a16-rtn"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _words(path: Path, num_docs: int, words_per_doc: int, seed: int) -> Path:
    """Text in the tiny models' word vocabulary ("w2" ... "w255")."""
    rng = random.Random(seed)
    docs = [" ".join(f"w{rng.randrange(2, 256)}" for _ in range(words_per_doc))
            for _ in range(num_docs)]
    path.write_text("\n\n".join(docs))
    return path


def _argv(model: Path, out: Path, data: Path, calib: Path, variants=VARIANTS) -> list[str]:
    return ["report", str(model), "--variants", ",".join(variants), "--engines", "torch",
            "-o", str(out), "--group-size", "32", "--calib", str(calib), "--calib-samples", "4",
            "--calib-seqlen", "32", "--data", str(data), "--ctx", "32", "--max-windows", "3",
            "--batch-sizes", "1,2", "--input-len", "8", "--output-len", "4", "--no-progress"]


@pytest.fixture(scope="module")
def report_run(tiny_model_factory, tmp_path_factory):
    """One report on the tiny Llama, then the same command again; both outputs."""
    tmp = tmp_path_factory.mktemp("report")
    data = _words(tmp / "data.txt", 4, 60, seed=1)
    calib = _words(tmp / "calib.txt", 10, 100, seed=0)
    out = tmp / "out"
    argv = _argv(tiny_model_factory("llama"), out, data, calib)
    runs = []
    for _ in range(2):
        start = time.perf_counter()
        code = cli_main(argv)
        mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
        runs.append({"code": code, "seconds": time.perf_counter() - start, "mtimes": mtimes})
    return out, runs


@pytest.fixture(scope="module")
def report_json(report_run) -> dict:
    out, _ = report_run
    return json.loads((out / "report.json").read_text())


def test_report_measures_every_variant_with_finite_perplexity(report_run, report_json):
    assert [r["code"] for r in report_run[1]] == [0, 0]
    assert list(report_json["variants"]) == VARIANTS
    for v in report_json["variants"].values():
        assert math.isfinite(v["accuracy"]["ppl"]) and v["accuracy"]["ppl"] > 1
        assert [r["batch_size"] for r in v["speed"]["torch"]["results"]] == [1, 2]


def test_fp16_against_itself_has_zero_kl_and_same_top_tokens(report_json):
    fp16 = report_json["variants"]["fp16"]["accuracy"]
    assert fp16["kl_mean"] == 0.0 and fp16["kl_max"] == 0.0
    assert fp16["same_top_rate"] == 1.0
    w4 = report_json["variants"]["w4a16-rtn"]["accuracy"]
    assert w4["kl_mean"] > 0


def test_quantized_checkpoints_are_smaller_than_fp16(report_json):
    sizes = {n: v["checkpoint_bytes"] for n, v in report_json["variants"].items()}
    assert sizes["w4a16-rtn"] < sizes["w8a16"] < sizes["fp16"]


def test_plots_are_nontrivial_pngs(report_run, report_json):
    out, _ = report_run
    assert len(report_json["plots"]) == 3
    for name in report_json["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name


def test_recommendation_names_measured_variants(report_run, report_json):
    rec = report_json["recommendation"]
    md = (report_run[0] / "report.md").read_text()
    for kind in ("latency", "throughput"):
        assert rec[kind]["variant"] in VARIANTS
        assert rec[kind]["variant"] in md and rec[kind]["reason"] in md


def test_second_run_reuses_checkpoints_and_results(report_run):
    _, (first, second) = report_run
    assert second["mtimes"] == first["mtimes"] and len(first["mtimes"]) == 2
    assert second["seconds"] < first["seconds"]


def test_second_run_prints_cached_for_every_step(tiny_model_factory, report_run, capsys):
    out, _ = report_run
    tmp = out.parent
    argv = _argv(tiny_model_factory("llama"), out, tmp / "data.txt", tmp / "calib.txt")
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "[done]" not in printed
    assert printed.count("[cached]") == 2 * 3 + 2  # accuracy + speed each, quantize twice
    assert "# Quantization report" in printed  # report.md is printed at the end


def test_an_added_variant_computes_only_its_own_steps(tiny_model_factory, report_run, capsys):
    out, _ = report_run
    tmp = out.parent
    argv = _argv(tiny_model_factory("llama"), out, tmp / "data.txt", tmp / "calib.txt",
                 VARIANTS + ["w8a8"])
    assert cli_main(argv) == 0
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[done]")]
    assert done == ["[done] w8a8 quantize", "[done] w8a8 accuracy", "[done] w8a8 speed (torch)"]


def test_unknown_variant_is_named_with_the_valid_ones(tmp_path, capsys):
    code = cli_main(["report", "unused-model", "--variants", "fp16,w3a16", "-o",
                     str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "'w3a16'" in err and "w4a16-awq" in err


def test_group_size_must_divide_the_linear_inputs():
    from types import SimpleNamespace

    cfg = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_heads=9, head_dim=64)
    check_group_size(cfg, 64)
    with pytest.raises(ValueError, match="--group-size 128 does not divide.*576"):
        check_group_size(cfg, 128)


def test_fp16_is_always_the_first_variant():
    assert [v.name for v in parse_variants("w4a16-rtn,w8a16")] == ["fp16", "w4a16-rtn", "w8a16"]


def test_pareto_front_keeps_only_undominated_points():
    # (tok/s, ppl): higher speed and lower ppl are better
    points = [(10, 20.0), (20, 21.0), (15, 22.0), (30, 25.0), (5, 19.0), (30, 30.0),
              (20, 21.0)]
    front = pareto_front(points)
    assert [points[i] for i in front] == [(5, 19.0), (10, 20.0), (20, 21.0), (30, 25.0)]
    assert pareto_front([]) == [] and pareto_front([(1.0, 1.0)]) == [0]
