"""Quantized linears (twinfer_kernels/quant_matmul.py) at Llama-3.1-8B shapes against fp16 cuBLAS and
the copy bandwidth measured in the same run (CUDA only; torch and triton only).

    PYTHONPATH=. python -m bench.quant_kernels [--quick] [--sweep] [--shapes 4096x6144] [--rows 1,16]

Times are GPU time per call: a CUDA graph runs the call over enough weight copies to exceed
L2 four times, and triton.testing.do_bench times its replay (eager calls of these few-us
kernels measure Python launch overhead instead). Bytes counted per call: the weight as stored
(codes + scales + zeros) plus x read and y written. Small M is bound by those bytes, so GB/s
over the device-to-device copy rate (read + write) is the figure of merit; large M is bound by
the tensor cores, so speed vs fp16 is. ``--sweep`` also times a few tile configs per case and
prints the best, for retuning ``choose_config`` on another GPU.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import triton

from twinfer.quant import QuantScheme, quantize_rtn
from twinfer_kernels.dense_gemv import dense_gemv
from twinfer_kernels.quant_matmul import (
    KernelConfig,
    _hopper,
    _num_sms,
    choose_config,
    prepare_quant_weight,
    quant_linear,
)

SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # (K, N)
ROWS = [1, 16, 256, 2048]
SCHEMES = {"w4a16-g128": QuantScheme(4, 128, False), "w8a16": QuantScheme(8, -1, True),
           "w8a8": QuantScheme(8, -1, True, act_bits=8)}


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB in bytes/s (read + write counted)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=200, return_mode="median")
    return 2 * x.numel() / (ms * 1e-3)


def bench_ms(call, weights: list) -> float:
    """GPU time of ``call(w)`` per weight: one CUDA graph calls it on every copy in ``weights``
    (together several times L2, so weights stream from HBM and launch gaps vanish, as in a
    graph-captured decode step); do_bench times the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for w in weights:  # compile and warm up outside the capture
            call(w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            call(w)
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    return ms / len(weights)


def copies(tensors, nbytes: int, make):
    """Enough clones of a weight to fill 4x a 50 MB L2 (at least 2)."""
    n = max(2, min(64, -(-200_000_000 // nbytes)))
    return [make([None if t is None else t.clone() for t in tensors]) for _ in range(n)]


def sweep_configs(m: int, bits: int, act_bits: int) -> list[KernelConfig]:
    """Tile shapes around each M bucket's default; split-K from 1 to 8 for small M."""
    C = KernelConfig
    if m == 1 and act_bits == 16:  # fp16 on CUDA: the half2 GEMV
        return [C("gemv_h2", 1, bn, 256, s, warps) for bn in (16, 32, 64)
                for s in (2, 4, 8, 16) for warps in (2, 4)]
    if m <= 16:
        cfgs = [C(kind, 16, bn, bk, s, 4, stages) for kind, stages in (("dot", 4), ("dot_tma", 3))
                for bn in (32, 64, 128) for bk in (128, 256) for s in (1, 2, 4, 8)]
        if m <= 4 and act_bits == 16:
            cfgs += [C("gemv", 1, bn, 256, s) for bn in (16, 32, 64) for s in (2, 4, 8)]
        return cfgs
    if act_bits == 16 and m <= 256:
        bm = min(256, triton.next_power_of_2(m))
        return [C(kind, b, bn, 128, s, w, 3) for kind in ("dot", "dot_tma")
                for b in (bm, bm // 2) for bn in (64, 128) for s in (1, 2, 4)
                for w in (4, 8)] + [C("dequant", 1, 64, 128)]
    if act_bits == 16:
        return [C("dot", 256, 128, 64, 1, 8, 3), C("dequant", 1, 64, 128),
                C("dequant", 1, 32, 256, num_warps=8)]
    if m <= 256:
        return [C("dot", 64, 64, 128, 1, 4, 4), C("dot", 128, 128, 128, 1, 8, 3),
                C("dot", 128, 64, 128, 1, 4, 4), C("dot", 64, 128, 128, 1, 4, 4)]
    return [C(kind, bm, bn, bk, 1, w, st) for kind in ("tma", "dot")
            for bm, bn, bk, w, st in [(128, 128, 128, 8, 3), (128, 128, 128, 4, 4),
                                      (128, 256, 128, 8, 3), (256, 128, 128, 8, 3),
                                      (128, 128, 64, 4, 4), (128, 256, 128, 8, 4)]]


def run_case(k: int, n: int, m: int, copy_bw: float, sweep: bool) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    dense = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    act_bytes = (m * k + m * n) * 2
    ms = bench_ms(lambda w: x @ w.T, copies([dense], n * k * 2, lambda ts: ts[0]))
    row = {"K": k, "N": n, "M": m, "fp16": (ms, (n * k * 2 + act_bytes) / (ms * 1e-3))}
    print(f"K={k} N={n} M={m}  fp16 {ms * 1e3:8.1f} us  "
          f"{row['fp16'][1] / 1e9:7.0f} GB/s ({100 * row['fp16'][1] / copy_bw:3.0f}% copy)  "
          f"{2 * m * n * k / (ms * 1e-3) / 1e12:6.1f} TFLOP/s")
    if m == 1:  # the dense Triton GEMV against cuBLAS at one row
        dense_cfgs = [(bn, bk, nw) for bn in (8, 16, 32) for bk in (128, 256, 512)
                      for nw in (4, 8)] if sweep else [(16, 256, 4)]
        times = []
        for bn, bk, nw in dense_cfgs:
            t = bench_ms(lambda w, c=(bn, bk, nw): dense_gemv(x, w, None, *c),
                         copies([dense], n * k * 2, lambda ts: ts[0]))
            times.append((t, (bn, bk, nw)))
        t, c = min(times)
        rate = (n * k * 2 + act_bytes) / (t * 1e-3)
        row["gemv"] = (t, rate)
        print(f"    dense gemv  {t * 1e3:8.1f} us  {rate / 1e9:7.0f} GB/s "
              f"({100 * rate / copy_bw:3.0f}% copy)  {row['fp16'][0] / t:5.2f}x cuBLAS  "
              f"(block_n, block_k, warps) {c}")
    for name, scheme in SCHEMES.items():
        w = prepare_quant_weight(quantize_rtn(dense, scheme), torch.float16)
        ws = copies([w.qweight, w.scales, w.zeros], w.nbytes, lambda ts, w=w: dataclasses.replace(
            w, qweight=ts[0], scales=ts[1], zeros=ts[2]))
        default = choose_config(m, n, k, w, _num_sms(x.device), half2=True,
                                tma=_hopper(x.device))
        ms = bench_ms(lambda w: quant_linear(x, w), ws)
        best = (ms, default)
        if sweep:
            for cfg in sweep_configs(m, w.bits, w.act_bits):
                try:
                    t = bench_ms(lambda w, cfg=cfg: quant_linear(x, w, config=cfg), ws)
                except Exception as e:  # noqa: BLE001 - a config may not fit shared memory
                    print(f"        {cfg}: {type(e).__name__}")
                    continue
                print(f"        {t * 1e3:8.1f} us {cfg}")
                best = min(best, (t, cfg), key=lambda b: b[0])
        rate = (w.nbytes + act_bytes) / (ms * 1e-3)
        row[name] = (ms, rate)
        print(f"    {name:11s} {ms * 1e3:8.1f} us  {rate / 1e9:7.0f} GB/s "
              f"({100 * rate / copy_bw:3.0f}% copy)  {row['fp16'][0] / ms:5.2f}x fp16")
        if sweep:
            print(f"        default {default}\n        best {best[0] * 1e3:.1f} us {best[1]}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, M in {1, 2048}")
    ap.add_argument("--sweep", action="store_true", help="also search tile configs per case")
    ap.add_argument("--shapes", help="K x N list, e.g. 4096x6144,14336x4096")
    ap.add_argument("--rows", help="M list, e.g. 1,16")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.quant_kernels needs a CUDA device")
    shapes, rows = (SHAPES[:1] + SHAPES[-1:], [1, 2048]) if args.quick else (SHAPES, ROWS)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.rows:
        rows = [int(v) for v in args.rows.split(",")]
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {copy_bw / 1e9:.0f} GB/s, "
          f"triton {triton.__version__}, torch {torch.__version__}")
    results = [run_case(k, n, m, copy_bw, args.sweep) for k, n in shapes for m in rows]
    names = list(SCHEMES)
    print("\n| K | N | M | fp16 us | " + " | ".join(f"{s} us (x fp16, % copy)" for s in names)
          + " |")
    print("|---:|---:|---:|---:|" + "---:|" * len(names))
    for r in results:
        cells = [f"{r[s][0] * 1e3:.1f} ({r['fp16'][0] / r[s][0]:.2f}x, "
                 f"{100 * r[s][1] / copy_bw:.0f}%)" for s in names]
        print(f"| {r['K']} | {r['N']} | {r['M']} | {r['fp16'][0] * 1e3:.1f} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
