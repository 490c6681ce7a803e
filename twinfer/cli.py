"""Command line: ``twinfer generate | chat | serve | quantize | eval | bench | report``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

from twinfer.outputs import RequestOutput
from twinfer.sampling import SamplingParams


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in name (smollm2-135m), HF directory or .gguf file")
    p.add_argument("--engine", default="auto", choices=["auto", "torch", "fast"])
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per engine step (prefill chunk budget; default 2048)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule step n+1 while step n runs on the device (default: on CUDA)")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights in MODEL's shapes (a preset such as "
                   "llama-3.1-8b, or a directory's config.json), to measure speed")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "int4", "k8v4"],
                   help="int8 / int4 / k8v4 (keys int8, values int4): K and V quantized per "
                   "token and head, about 0.52 / 0.28 / 0.40 of the fp16 KV memory")
    p.add_argument("--quantization", default=None, metavar="SCHEME",
                   help="RTN-quantize a dense model while loading: w4a16, w4a16-g64, "
                   "w4a16-g128-sym, w8a16, w8a8")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twinfer", description="twinfer: quantization-"
                                     "focused LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete one or more prompts")
    _add_engine_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("--prompt", action="append", required=True,
                     help="prompt text (repeat for a batch)")
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--stats", action="store_true", help="print tokens/s to stderr")
    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' (or set TWINFER_API_KEY)")
    serve.add_argument("--served-model-name", default=None,
                       help="model name clients send (default: the MODEL argument)")
    serve.add_argument("--max-waiting", type=int, default=1024,
                       help="waiting requests beyond which new ones get 503")
    chat = sub.add_parser("chat", help="interactive chat, streamed to the terminal")
    _add_engine_args(chat)
    _add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="system message")
    from bench import cli as bench_cli
    from bench import quant_report
    from quantize import cli as quantize_cli
    from twinfer import cli_eval
    quantize_cli.register(sub)
    cli_eval.register(sub)
    bench_cli.register(sub)
    quant_report.register(sub)
    return parser


def _make_llm(args: argparse.Namespace):
    from twinfer.llm import LLM

    return LLM(args.model, **_llm_kwargs(args))


def _llm_kwargs(args: argparse.Namespace) -> dict:
    """The engine arguments every subcommand that loads a model shares."""
    return dict(engine=args.engine, dtype=args.dtype, device=args.device,
                max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                num_kv_blocks=args.num_kv_blocks,
                max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=not args.no_prefix_caching,
                load_format=args.load_format, quantization=args.quantization,
                async_scheduling=args.async_scheduling, kv_cache_dtype=args.kv_cache_dtype)


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def _print_stream(stream: Iterator[RequestOutput]) -> RequestOutput | None:
    """Print each new piece of text as it arrives; return the final output."""
    printed, last = 0, None
    for out in stream:
        text = out.outputs[0].text
        sys.stdout.write(text[printed:])
        sys.stdout.flush()
        printed, last = len(text), out
    sys.stdout.write("\n")
    return last


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    params = _sampling_params(args)
    prompts = ([llm.tokenizer.encode_chat([{"role": "user", "content": p}])
                for p in args.prompt] if args.chat else args.prompt)
    start = time.perf_counter()
    if len(prompts) == 1:
        outputs = [_print_stream(llm.stream(prompts[0], params))]
    else:
        outputs = llm.generate(prompts, params, use_tqdm=True)
        for prompt, out in zip(args.prompt, outputs):
            print(f"--- {prompt!r}\n{out.outputs[0].text}")
    elapsed = time.perf_counter() - start
    if args.stats:
        n = sum(len(o.outputs[0].token_ids) for o in outputs)
        print(f"[{n} tokens in {elapsed:.2f} s: {n / elapsed:.1f} tok/s, "
              f"engine={llm.config.engine}, device={llm.config.device}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    params = _sampling_params(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("twinfer chat: type a message; /reset clears the history, /exit or Ctrl-D quits.")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history.clear()
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        prompt = llm.tokenizer.encode_chat(system + history)
        try:
            final = _print_stream(llm.stream(prompt, params))
        except ValueError as e:  # e.g. the conversation outgrew max_model_len
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": final.outputs[0].text if final else ""})


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from serve.server import run_server
    except ImportError as e:
        raise RuntimeError(f"serving needs the 'serve' extra: pip install 'twinfer[serve]' "
                           f"({e})") from e
    run_server(args.model, host=args.host, port=args.port,
               served_model_name=args.served_model_name, api_key=args.api_key,
               max_waiting=args.max_waiting, **_llm_kwargs(args))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from quantize import cli as quantize_cli
    return quantize_cli.run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from twinfer import cli_eval
    return cli_eval.run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from bench import cli as bench_cli
    return bench_cli.run(args)


def cmd_report(args: argparse.Namespace) -> int:
    from bench import quant_report
    return quant_report.run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve,
                "quantize": cmd_quantize, "eval": cmd_eval,
                "bench": cmd_bench, "report": cmd_report}[args.command](args)
    except (ValueError, RuntimeError) as e:
        print(f"twinfer: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
