"""``twinfer bench serve`` (an HTTP load generator) and ``twinfer bench offline`` (the engine
without HTTP). ``register`` adds them to a parent parser; ``run`` dispatches.

Until twinfer/cli.py wires them in: ``python -m bench.cli bench serve --base-url ...``.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` with its ``serve`` and ``offline`` subcommands to ``subparsers``."""
    from bench.offline import add_offline_args
    from bench.serve_load import add_serve_args

    bench = subparsers.add_parser("bench", help="benchmark a server (serve) or the engine "
                                  "(offline)")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    add_serve_args(sub.add_parser(
        "serve", help="load-test an OpenAI-compatible server (twinfer, vLLM, LMDeploy)",
        description="Streamed requests at each concurrency level; TTFT, TPOT, ITL, E2E "
                    "percentiles and throughput."))
    add_offline_args(sub.add_parser(
        "offline", help="engine latency and throughput per batch size, no HTTP",
        description="Prefill time, decode step time, tok/s, peak memory and (CUDA) the "
                    "fraction of the HBM roofline per batch size."))
    return bench


def run(args: argparse.Namespace) -> int:
    if args.bench_command == "serve":
        from bench.serve_load import run as run_serve

        return run_serve(args)
    from bench.offline import run as run_offline

    return run_offline(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twinfer")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, RuntimeError) as e:
        print(f"twinfer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
