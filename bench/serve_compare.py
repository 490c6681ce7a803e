"""``twinfer serve`` under ``twinfer bench serve``, one server per variant, in one run.

    python -m bench.serve_compare [--model llama-3.1-8b] [--variants fp16,w4a16]
        [--concurrency 1,100] [--num-prompts 3,100] [--input-len 2048] [--output-len 2048]
        [-o DIR]

Each variant starts a real server process (random weights in the model's shapes through
``--load-format dummy``, RTN-quantized at load for the quantized variants; "fp16" is the dtype
``auto`` picks on CUDA), waits for ``/health``, runs the load generator against it over HTTP
and stops it; the server's log and the benchmark's JSON go to ``-o DIR``. The table printed
last has one row per variant and concurrency level.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.cli import main as bench_main

# variant -> extra `twinfer serve` arguments
VARIANTS = {"fp16": [], "w8a16": ["--quantization", "w8a16"],
            "w4a16": ["--quantization", "w4a16-g128-sym"], "w8a8": ["--quantization", "w8a8"]}


def wait_healthy(server: subprocess.Popen, url: str, timeout: float) -> None:
    """Return once ``url`` answers 200; fail if the server exits or ``timeout`` passes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with code {server.returncode} before it was "
                               "healthy (see its log)")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s")


def run_variant(args: argparse.Namespace, variant: str, port: int, out: Path) -> list[dict]:
    """Serve ``variant``, benchmark it, stop it; the benchmark's per-level results."""
    cmd = [sys.executable, "-m", "twinfer.cli", "serve", args.model, "--load-format", "dummy",
           "--port", str(port), "--max-num-seqs", str(args.max_num_seqs),
           "--max-model-len", str(args.input_len + args.output_len + 16),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), *VARIANTS[variant],
           *shlex.split(args.server_args)]
    log = open(out / f"server-{variant}.log", "w")
    started = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(server, f"http://127.0.0.1:{port}/health", args.startup_timeout)
        print(f"{variant}: server up in {time.perf_counter() - started:.0f} s", flush=True)
        bench_dir = out / f"bench-{variant}"
        rc = bench_main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}",
                         "--concurrency", args.concurrency, "--num-prompts", args.num_prompts,
                         "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                         *(["--token-range", args.token_range] if args.token_range else []),
                         "-o", str(bench_dir)])
        if rc != 0:
            print(f"{variant}: bench serve exited with {rc}", flush=True)
        result = json.loads(next(bench_dir.glob("serve-*.json")).read_text())
        return result["results"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b",
                    help="shape preset or directory with config.json (weights are random)")
    ap.add_argument("--variants", default="fp16,w4a16")
    ap.add_argument("--concurrency", default="1,100")
    ap.add_argument("--num-prompts", default="3,100")
    ap.add_argument("--input-len", type=int, default=2048)
    ap.add_argument("--output-len", type=int, default=2048)
    ap.add_argument("--token-range", default=None,
                    help="LO:HI of random prompt ids (default: bench serve's, from vocab_size)")
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--server-args", default="",
                    help="extra `twinfer serve` flags for every variant, e.g. "
                         "'--no-async-scheduling'")
    ap.add_argument("-o", "--output-dir", default="bench-results/serve-compare")
    args = ap.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in args.variants.split(","):
        try:
            rows += [(variant, r) for r in run_variant(args, variant, args.port, out)]
        except Exception as e:  # noqa: BLE001 - report the failure, measure the others
            print(f"{variant}: FAILED {type(e).__name__}: {e}", flush=True)
    print(f"\nmodel {args.model} (random weights), {args.input_len} in / {args.output_len} out")
    print("| variant | concurrency | requests | failed | output tok/s | total tok/s | "
          "TTFT p50 s | TTFT p99 s | TPOT p50 ms | TPOT p99 ms | ITL p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant, r in rows:
        print(f"| {variant} | {r['concurrency']} | {r['num_prompts']} | {r['num_failed']} | "
              f"{r['output_throughput']:,.1f} | {r['total_token_throughput']:,.1f} | "
              f"{_stat(r, 'ttft', 'p50', 1)} | {_stat(r, 'ttft', 'p99', 1)} | "
              f"{_stat(r, 'tpot', 'p50', 1e3)} | {_stat(r, 'tpot', 'p99', 1e3)} | "
              f"{_stat(r, 'itl', 'p99', 1e3)} |")


def _stat(result: dict, metric: str, key: str, scale: float) -> str:
    stats = result.get(metric)
    return "-" if not stats else f"{stats[key] * scale:.2f}"

if __name__ == "__main__":
    main()
