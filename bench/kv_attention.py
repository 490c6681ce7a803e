"""The attention kernels on each KV-cache format at Llama-3.1-8B's attention shapes (32 query
heads, 8 KV heads, head_dim 128, fp16; random caches), one layer, CUDA only.

    python -m bench.kv_attention [--formats auto,int8,int4,k8v4] [--sweep]

Counts first. Decode attention at batch 64 x context 4,096 reads every cached byte once:
fp16 2 x 64 x 4,096 x 8 x 128 x 2 B = 1,074 MB, 253 us at 4.25 TB/s; int8 takes (D + 4) / 2D
of that (0.52), int4 (D / 2 + 8) / 2D (0.28), k8v4 0.40, so at the same fraction of the
bandwidth they should take ~132, ~71 and ~102 us. The batch-1 row is the fused decode step's
attention (rotary, the new token's quantized store and, for int4 keys, the Hadamard rotation of
q and k): 4 MB of fp16 KV, so a few us of bytes and the rest fixed cost. Prefill attention of
one 2,048-token prompt is compute-bound (4 x 2,048^2 / 2 x 32 x 128 FLOPs causal = 34 GFLOP),
so there a quantized cache can only cost; the rotary-and-write kernel that fills the cache for
that prompt is in the last row. ``--sweep`` also times the decode kernel's tile (block_n) and
warps per program and pipeline stages for each format.
"""

from __future__ import annotations

import argparse
import datetime

import torch
import triton

from bench.fast_roofline import (
    cache_bytes,
    copy_bandwidth,
    filled_caches,
    matmul_rate,
)
from twinfer_kernels.decode_attention import NewKV, decode_attention
from twinfer_kernels.prefill_attention import make_tiles, prefill_attention
from twinfer_kernels.rotary_kv import rotary_and_write_kv

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16  # Llama-3.1-8B's attention


def graph_ms(call, reps: int = 50) -> float:
    """ms per call of ``reps`` calls replayed in one CUDA graph (as the engine's decode step
    runs them: no launch gaps)."""
    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            call()
    return triton.testing.do_bench(graph.replay, return_mode="median") / reps


def _decode_setup(kind: str, batch: int, ctx: int):
    blocks = batch * ctx // BLOCK_SIZE
    kc, vc = filled_caches(kind, blocks + 1, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
    tables = torch.arange(blocks, dtype=torch.int32, device="cuda").view(batch, -1)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return kc, vc, q, tables, lens


def decode_rows(kind: str, bw: float, sweep: bool) -> list[dict]:
    rows = []
    # batch 64 x context 4,096: the bandwidth-bound case (one split, as engine_fast picks there)
    kc, vc, q, tables, lens = _decode_setup(kind, 64, 4096)
    kv = cache_bytes(kc) + cache_bytes(vc)
    configs = [(bn, w, st) for bn in (32, 64, 128) for w in (4, 8) for st in (3, 5)] \
        if sweep else [(None, 4, 3)]
    for block_n, warps, stages in configs:
        def call(block_n=block_n, warps=warps, stages=stages):
            return decode_attention(q, kc, vc, tables, lens, HEAD_DIM ** -0.5, 1,
                                    block_n=block_n, num_warps=warps, num_stages=stages)
        try:
            ms = triton.testing.do_bench(call, return_mode="median")
        except triton.runtime.errors.OutOfResources:
            continue
        rows.append({"kind": kind, "what": f"decode b64 x 4096 (block_n {block_n or 'default'}, "
                     f"{warps} warps, {stages} stages)", "us": ms * 1e3,
                     "fraction": kv / (ms * 1e-3) / bw})
    del kc, vc
    # batch 1 x context 1,024, the fused decode step's attention (16 splits)
    kc, vc, q, tables, lens = _decode_setup(kind, 1, 1024)
    k_new = torch.randn(1, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
    new = NewKV(k_new, torch.randn_like(k_new), lens.long() - 1, inv_freq,
                torch.tensor([1023], device="cuda"))
    kv = cache_bytes(kc) + cache_bytes(vc)
    ms = graph_ms(lambda: decode_attention(q, kc, vc, tables, lens, HEAD_DIM ** -0.5, 16,
                                           new_kv=new, pdl=True))
    rows.append({"kind": kind, "what": "decode b1 x 1024, fused (rotary, store)",
                 "us": ms * 1e3, "fraction": kv / (ms * 1e-3) / bw})
    return rows


def prefill_rows(kind: str, rate: float, bw: float) -> list[dict]:
    t = 2048
    kc, vc = filled_caches(kind, t // BLOCK_SIZE + 1, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    q = torch.randn(t, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
    tables = torch.arange(t // BLOCK_SIZE, dtype=torch.int32, device="cuda").view(1, -1)
    qsl = torch.tensor([0, t], dtype=torch.int32, device="cuda")
    lens = torch.tensor([t], dtype=torch.int32, device="cuda")
    tiles = make_tiles([t], 64, q.device)
    ms = triton.testing.do_bench(lambda: prefill_attention(
        q, kc, vc, tables, qsl, lens, [t], HEAD_DIM ** -0.5, tiles=tiles), return_mode="median")
    flops = 4 * t * t / 2 * HEADS * HEAD_DIM
    rows = [{"kind": kind, "what": f"prefill attention {t} tokens", "us": ms * 1e3,
             "fraction": flops / (ms * 1e-3) / rate}]
    k = torch.randn(t, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    positions = torch.arange(t, device="cuda")
    inv_freq = 1.0 / (500000 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
    ms = triton.testing.do_bench(lambda: rotary_and_write_kv(
        q, k, v, positions, inv_freq, kc, vc, positions), return_mode="median")
    moved = 2 * (q.nbytes + k.nbytes) + v.nbytes + cache_bytes(kc) + cache_bytes(vc)
    rows.append({"kind": kind, "what": f"rotary + cache write {t} tokens", "us": ms * 1e3,
                 "fraction": moved / (ms * 1e-3) / bw})
    return rows



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="auto,int8,int4,k8v4")
    ap.add_argument("--sweep", action="store_true",
                    help="decode at batch 64: block_n 32/64/128 x 4/8 warps x 3/5 stages")
    args = ap.parse_args()
    bw = copy_bandwidth()
    rate = matmul_rate(torch.float16)
    print(f"device: {torch.cuda.get_device_name()}  date: {datetime.date.today()}  "
          f"copy bandwidth: {bw / 1e12:.2f} TB/s  fp16 matmul: {rate / 1e12:.0f} TFLOP/s")
    print("| KV cache | measurement | us | fraction of roofline |")
    print("|---|---|---:|---:|")
    for kind in args.formats.split(","):
        for row in decode_rows(kind, bw, args.sweep) + prefill_rows(kind, rate, bw):
            print(f"| {row['kind']} | {row['what']} | {row['us']:.1f} | {row['fraction']:.1%} |",
                  flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
