"""engine_fast at Llama-3.1-8B shapes with random weights, against the roofline measured in
the same run (CUDA only).

    python -m bench.fast_roofline [--layers 32] [--batches 1,64,256] [--context 1024]
        [--no-hf] [--no-serving] [--kv-cache-dtype auto|int8|int4|k8v4]

Counts first: a decode step reads every weight byte once (linears + lm_head) plus each
sequence's K/V, so tokens/s <= bandwidth / bytes per step x batch. Prefill of T tokens costs
2 x params x T FLOPs plus attention, bounded by the dense fp16 matmul rate. Then, in the same
process: the decode batches up to 64 and the prefill through transformers' ``generate``
(bench/hf_generate.py; ``--no-hf`` skips), and the serving-style run of
bench/engine_throughput.py (100 requests of 1,024 in and 1,024 out; ``--no-serving`` skips).
The last table sets each figure against engine_fast's targets (issue #3). With
``--kv-cache-dtype int8|int4|k8v4`` the engine and the attention kernel read a quantized cache
(codes plus float32 parameters per token and head: (D + 4) / 2D or (D / 2 + 8) / 2D of fp16's
KV bytes), and the roofline counts those bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch
import triton

from twinfer.batch import ScheduledBatch
from twinfer.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from twinfer.dummy import SHAPE_PRESETS, dummy_weights
from twinfer.kv_cache_memory import (
    Int4KVCache,
    Int8KVCache,
    KVCache,
    hadamard,
    kv_block_bytes,
    quantize_kv,
    quantize_kv_int4,
)
from twinfer_kernels.decode_attention import decode_attention


def filled_caches(kind: str, num_blocks: int, block_size: int, num_kv_heads: int,
                  head_dim: int, dtype: torch.dtype = torch.float16
                  ) -> tuple[KVCache, KVCache]:
    """Random K and V caches of ``kind`` (auto: the model dtype) on CUDA, keys of int4 caches
    in the Hadamard basis as the engines keep them."""
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    if kind == "auto":
        return k, v
    if kind in ("int8", "k8v4"):
        kc: KVCache = Int8KVCache(*quantize_kv(k))
    else:
        kc = Int4KVCache(*quantize_kv_int4(k.float() @ hadamard(head_dim, k.device)),
                         rotated=True)
    vc: KVCache = Int8KVCache(*quantize_kv(v)) if kind == "int8" else \
        Int4KVCache(*quantize_kv_int4(v))
    return kc, vc


def cache_bytes(cache: KVCache) -> int:
    """Bytes of a cache: its tensor, or its codes and parameters."""
    if isinstance(cache, torch.Tensor):
        return cache.nbytes
    return sum(t.nbytes for t in cache.tensors())


def llama31_8b_config(num_layers: int) -> dict:
    """Llama-3.1-8B's config.json, with ``num_layers`` decoder layers."""
    return {**SHAPE_PRESETS["llama-3.1-8b"], "num_hidden_layers": num_layers}


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s (read + write counted)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=200)
    return 2 * x.numel() / (ms * 1e-3)


def matmul_rate(dtype: torch.dtype) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=20, rep=100)
    return 2 * 8192 ** 3 / (ms * 1e-3)


def decode_batch(n: int, context: int, block_size: int) -> ScheduledBatch:
    """n sequences, each decoding its token at position context - 1, blocks laid out in order."""
    blocks_per_seq = -(-context // block_size)
    tables = [list(range(s * blocks_per_seq, (s + 1) * blocks_per_seq)) for s in range(n)]
    pos = context - 1
    return ScheduledBatch(
        seqs=[None] * n, input_ids=[7] * n, positions=[pos] * n, query_lens=[1] * n,
        context_lens=[context] * n, block_tables=tables,
        slot_mapping=[t[pos // block_size] * block_size + pos % block_size for t in tables],
        logits_indices=list(range(n)), sample_seq_indices=list(range(n)),
        sample_logit_rows=list(range(n)))


def prefill_batch(tokens: int, block_size: int) -> ScheduledBatch:
    table = list(range(-(-tokens // block_size)))
    return ScheduledBatch(
        seqs=[None], input_ids=[7] * tokens, positions=list(range(tokens)), query_lens=[tokens],
        context_lens=[tokens], block_tables=[table],
        slot_mapping=[table[p // block_size] * block_size + p % block_size
                      for p in range(tokens)],
        logits_indices=[tokens - 1], sample_seq_indices=[0], sample_logit_rows=[0])


def engine_rows(args: argparse.Namespace, batches: list[int], bw: float, mm: float,
                dtype: torch.dtype, bs: int) -> tuple[list[dict], ModelConfig, int]:
    """engine_fast's decode batches, prefill and attention kernel against the roofline; returns
    the rows, the model config and the weight bytes a decode step reads."""
    from engine_fast.runner import FastRunner

    weights = dummy_weights(llama31_8b_config(args.layers), dtype, "cuda")
    cfg = weights.config
    max_blocks = max(batches) * -(-args.context // bs) + 1
    kv_dtype = args.kv_cache_dtype
    config = EngineConfig(model=cfg, cache=CacheConfig(block_size=bs, num_kv_blocks=max_blocks,
                                                       kv_cache_dtype=kv_dtype),
                          scheduler=SchedulerConfig(max_num_seqs=max(batches),
                                                    max_model_len=max(args.context, args.prefill)),
                          engine="fast", device="cuda", dtype=dtype)
    runner = FastRunner(config, weights)
    del weights
    torch.cuda.empty_cache()
    runner.allocate_kv_cache(max_blocks)

    m = runner.model
    linear_bytes = sum(t.nbytes for layer in m.layers
                       for t in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj,
                                 layer.down_proj))
    head_bytes = m.lm_head.numel() * m.lm_head.element_size()
    kv_bytes_per_token = kv_block_bytes(cfg, bs, dtype, kv_dtype) // bs
    rows = []
    for n in batches:
        batch = decode_batch(n, args.context, bs)
        ms = triton.testing.do_bench(lambda b=batch: runner.execute(b), warmup=10, rep=100)
        step_bytes = linear_bytes + head_bytes + n * args.context * kv_bytes_per_token
        roofline_ms = step_bytes / bw * 1e3
        rows.append({"what": f"decode batch {n}, context {args.context}", "ms": ms,
                     "tok/s": n / ms * 1e3, "roofline tok/s": n / roofline_ms * 1e3,
                     "fraction": roofline_ms / ms})
    # prefill: 2 * (linear params) * T + attention (causal: 2 * 2 * T^2/2 * H * D per layer)
    t = args.prefill
    pb = prefill_batch(t, bs)
    # do_bench's warmup and rep are milliseconds: ~10 prefills, median (20 ms was one call)
    ms = triton.testing.do_bench(lambda: runner.execute(pb), warmup=100, rep=500,
                                 return_mode="median")
    flops = 2 * (linear_bytes // 2) * t + 2 * cfg.num_layers * t * t * cfg.num_heads \
        * cfg.head_dim + 2 * (head_bytes // 2)
    rows.append({"what": f"prefill {t} tokens", "ms": ms, "TFLOP/s": flops / ms / 1e9,
                 "fraction": flops / (ms * 1e-3) / mm})
    # decode attention kernel alone, batch 64 x context 4096, one layer
    n, ctx = 64, 4096
    blocks = n * ctx // bs
    kc, vc = filled_caches(kv_dtype, blocks, bs, cfg.num_kv_heads, cfg.head_dim, dtype)
    kv = cache_bytes(kc) + cache_bytes(vc)
    q = torch.randn(n, cfg.num_heads, cfg.head_dim, device="cuda", dtype=dtype)
    tables = torch.arange(blocks, dtype=torch.int32, device="cuda").view(n, ctx // bs)
    lens = torch.full((n,), ctx, dtype=torch.int32, device="cuda")
    splits = runner._num_splits(n)
    ms = triton.testing.do_bench(lambda: decode_attention(q, kc, vc, tables, lens,
                                                          cfg.head_dim ** -0.5, splits))
    rows.append({"what": f"decode attention kernel, batch {n} x context {ctx}", "ms": ms,
                 "GB/s": kv / ms / 1e6, "fraction": kv / (ms * 1e-3) / bw})

    return rows, cfg, linear_bytes + head_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--json", default=None)
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "int4", "k8v4"],
                    help="the engine and the attention kernel read a quantized KV cache")
    ap.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True,
                    help="also time transformers' generate")
    ap.add_argument("--serving", action=argparse.BooleanOptionalAction, default=True,
                    help="also run bench.engine_throughput's 100 x (1024 in, 1024 out)")
    args = ap.parse_args()
    dtype, bs = torch.float16, 16
    batches = [int(b) for b in args.batches.split(",")]
    bw, mm = copy_bandwidth(), matmul_rate(dtype)
    rows, cfg, weight_bytes = engine_rows(args, batches, bw, mm, dtype, bs)
    torch.cuda.empty_cache()
    print(f"device: {torch.cuda.get_device_name()}  date: {datetime.date.today()}  "
          f"layers: {cfg.num_layers}  copy bandwidth: {bw / 1e12:.2f} TB/s  "
          f"fp16 matmul: {mm / 1e12:.0f} TFLOP/s  weights: {weight_bytes / 1e9:.2f} GB  "
          f"KV cache: {args.kv_cache_dtype}")
    print("| measurement | ms | rate | roofline fraction |")
    print("|---|---:|---:|---:|")
    for r in rows:
        rate = next(f"{r[k]:.1f} {k}" for k in ("tok/s", "TFLOP/s", "GB/s") if k in r)
        extra = f" (roofline {r['roofline tok/s']:.1f} tok/s)" if "roofline tok/s" in r else ""
        print(f"| {r['what']} | {r['ms']:.3f} | {rate}{extra} | {r['fraction']:.1%} |")
    if args.hf:
        from bench.hf_generate import hf_rows

        ours = {r["what"]: r for r in rows}
        hf = hf_rows(llama31_8b_config(args.layers), [n for n in batches if n <= 64],
                     args.context, args.prefill, dtype, "cuda")
        print("| transformers generate | ms | tok/s | engine_fast speed-up |")
        print("|---|---:|---:|---:|")
        for r in hf:
            print(f"| {r['what']} | {r['ms']:.3f} | {r['tok/s']:.1f} | "
                  f"{r['ms'] / ours[r['what']]['ms']:.1f}x |")
        rows += [{**r, "what": "transformers " + r["what"]} for r in hf]
        torch.cuda.empty_cache()
    if args.serving:
        from bench.engine_throughput import serving_throughput

        r = serving_throughput(layers=args.layers, kv_cache_dtype=args.kv_cache_dtype)
        rows.append({"what": "serving 100 x (1024 in, 1024 out)", "ms": r["seconds"] * 1e3,
                     **r})
        print("| serving 100 x (1024 in, 1024 out) | output tokens | s | output tok/s | "
              "total tok/s |")
        print("|---|---:|---:|---:|---:|")
        print(f"| engine_fast, async scheduling | {r['output tokens']} | {r['seconds']:.1f} | "
              f"{r['output tok/s']:.0f} | {r['total tok/s']:.0f} |")
    print_targets(rows, batches, args.context, args.prefill, torch.cuda.get_device_name())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth": bw, "matmul": mm, "rows": rows}, f, indent=1)


def print_targets(rows: list[dict], batches: list[int], context: int, prefill: int,
                  device_name: str) -> None:
    """The short table last: each figure against issue #3's target."""
    by = {r["what"]: r for r in rows}
    targets = [(f"decode batch 1, context {context}", 0.85),
               (f"decode batch 64, context {context}", 0.70),
               (f"decode batch 256, context {context}", None),
               (f"prefill {prefill} tokens", 0.60),
               ("decode attention kernel, batch 64 x context 4096", 0.80)]
    print("| target | measured | met |")
    print("|---|---:|---|")
    for what, goal in targets:
        if what in by:
            got = by[what]["fraction"]
            verdict = "reported" if goal is None else ("yes" if got >= goal else "no")
            goal_text = "report" if goal is None else f">= {goal:.0%}"
            print(f"| {what}: {goal_text} of roofline | {got:.1%} | {verdict} |")
    serving = by.get("serving 100 x (1024 in, 1024 out)")
    if serving:
        got = serving["output tok/s"]
        print(f"| serving 100 x (1024 in, 1024 out): > 5,792 output tok/s (LMDeploy PyTorch "
              f"engine, on an H100) | {got:,.0f} | {'yes' if got > 5792 else 'no'} "
              f"(on {device_name}) |")
    for n in batches + ["prefill"]:
        what = f"prefill {prefill} tokens" if n == "prefill" else f"decode batch {n}, context {context}"
        hf = by.get("transformers " + what)
        if hf and what in by:
            print(f"| {what}: speed-up over transformers generate | "
                  f"{hf['ms'] / by[what]['ms']:.1f}x | reported |")


if __name__ == "__main__":
    main()
