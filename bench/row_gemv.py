"""The batch-1 decode projections of one Llama-3.1-8B layer: twinfer_kernels/dense_gemv.py with the
RMSNorm / SiLU-and-mul / residual add fused in, tile by tile, against what the unfused step
runs for the same work (cuBLAS or the plain GEMV, plus the separate small kernels). CUDA only.

    PYTHONPATH=. python -m bench.row_gemv [--quick]

Times are GPU time per call from a CUDA graph over enough weight copies to exceed L2 (as in
bench/quant_kernels.py); the roofline is the weight's bytes over the copy bandwidth measured in
the same run. ``--quick`` times only the default tile. Prints the best tile per projection,
from which ``twinfer_kernels.dense_gemv.row_gemv_tile`` is set; then the batch-1 decode attention
(rotary and KV write fused) at context 1,024 by number of context splits.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.quant_kernels import bench_ms, copies, copy_bandwidth
from twinfer_kernels.decode_attention import NewKV, decode_attention
from twinfer_kernels.dense_gemv import dense_gemv, row_gemv_tile
from twinfer_kernels.elementwise import rms_norm, silu_and_mul

HIDDEN, INTER, QKV = 4096, 14336, 6144
TILES = [(bn, bk, nw) for bn in (4, 8, 16, 32) for bk in (256, 512, 1024) for nw in (4, 8, 16)
         if bn * bk // (32 * nw) >= 4]  # at least 4 weights per thread and tile


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    dt = torch.float16
    bw = copy_bandwidth()
    h, res, norm_w, o, gate_up = layer_inputs(dt)
    # name, (N, K), fused call, unfused call (the step without fusion: o_proj already GEMV)
    cases = [
        ("qkv + input norm", (QKV, HIDDEN),
         lambda w, t: dense_gemv(h, w, None, *t, norm_weight=norm_w),
         lambda w: F.linear(rms_norm(h, norm_w, 1e-5, res)[0], w)),
        ("o + residual", (HIDDEN, HIDDEN),
         lambda w, t: dense_gemv(o, w, None, *t, residual=res),
         lambda w: dense_gemv(o, w)),
        ("gate/up + post norm", (2 * INTER, HIDDEN),
         lambda w, t: dense_gemv(h, w, None, *t, norm_weight=norm_w),
         lambda w: F.linear(rms_norm(h, norm_w, 1e-5, res)[0], w)),
        ("down + SiLU + residual", (HIDDEN, INTER),
         lambda w, t: dense_gemv(gate_up, w, None, *t, silu=True, residual=res),
         lambda w: F.linear(silu_and_mul(gate_up), w)),
    ]
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s")
    print("| projection | N x K | roofline us | unfused us | fused default us | best tile "
          "(block_n, block_k, warps) | best us | % of roofline |")
    print("|---|---|---:|---:|---:|---|---:|---:|")
    for name, (n, k), fused, unfused in cases:
        ws = copies([torch.randn(n, k, device="cuda", dtype=dt) * 0.02], n * k * 2,
                    lambda ts: ts[0])
        roof = n * k * 2 / bw * 1e6
        t_unfused = bench_ms(unfused, ws) * 1e3
        tile = row_gemv_tile(n, k)
        t_default = bench_ms(lambda w, f=fused, t=tile: f(w, t), ws) * 1e3
        best = (t_default, tile)
        for tile in [] if args.quick else TILES:
            best = min(best, (bench_ms(lambda w, f=fused, t=tile: f(w, t), ws) * 1e3, tile))
        print(f"| {name} | {n} x {k} | {roof:.1f} | {t_unfused:.1f} | {t_default:.1f} | "
              f"{best[1]} | {best[0]:.1f} | {100 * roof / best[0]:.0f}% |", flush=True)
        del ws
    attention_by_splits()


def layer_inputs(dt: torch.dtype) -> tuple[torch.Tensor, ...]:
    """One decode row's GEMV inputs in a Llama-8B layer: the residual stream h, the residual,
    the norm weight, the attention output o and [gate | up]."""
    return (torch.randn(1, HIDDEN, device="cuda", dtype=dt),
            torch.randn(1, HIDDEN, device="cuda", dtype=dt),
            torch.ones(HIDDEN, device="cuda", dtype=dt),
            torch.randn(1, HIDDEN, device="cuda", dtype=dt),
            torch.randn(1, 2 * INTER, device="cuda", dtype=dt))


def attention_by_splits(context: int = 1024, block_size: int = 16) -> None:
    """Batch-1 decode attention at Llama-8B's 32 query / 8 KV heads, per split count: one
    layer's kernels (attention, plus the combine when split) in a graph over 32 layers' caches."""
    H, Hkv, D, dt = 32, 8, 128, torch.float16
    nblk = context // block_size
    caches = [(torch.randn(nblk, block_size, Hkv, D, device="cuda", dtype=dt),
               torch.randn(nblk, block_size, Hkv, D, device="cuda", dtype=dt))
              for _ in range(32)]
    tables = torch.arange(nblk, device="cuda", dtype=torch.int32)[None]
    ctx = torch.tensor([context], device="cuda", dtype=torch.int32)
    qkv = torch.randn(1, (H + 2 * Hkv) * D, device="cuda", dtype=dt)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    new = NewKV(k.view(1, Hkv, D), v.view(1, Hkv, D), ctx.long() - 1,
                torch.ones(D // 2, device="cuda"), ctx.long() - 1)
    print("| attention splits | block_n | us per layer |")
    print("|---:|---:|---:|")
    for splits in (1, 2, 4, 8, 16, 32):
        for block_n in (32, 64, 128):
            t = bench_ms(lambda c, s=splits, b=block_n: decode_attention(
                q.view(1, H, D), c[0], c[1], tables, ctx, D ** -0.5, num_splits=s, block_n=b,
                new_kv=new), caches) * 1e3
            print(f"| {splits} | {block_n} | {t:.1f} |", flush=True)


if __name__ == "__main__":
    main()
