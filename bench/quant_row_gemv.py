"""The batch-1 decode projections of one Llama-3.1-8B layer through the quantized one-row GEMV
(twinfer_kernels/quant_matmul.py; the half2 kernel for fp16 on CUDA) with the RMSNorm /
SiLU-and-mul / residual add fused in, against the unfused sequence (separate small kernels,
then the plain GEMV). CUDA only.

    PYTHONPATH=. python -m bench.quant_row_gemv [--quick] [--schemes w4a16-g128,w8a16]

Times are GPU time per call from a CUDA graph over enough weight copies to exceed L2 (as in
bench/quant_kernels.py); the roofline is the weight's bytes (codes, scales, zeros) over the
copy bandwidth measured in the same run. Columns: unfused sequence; the plain GEMV alone;
fused; fused with programmatic dependent launch (consecutive calls overlap, as in the decode
step's chain); the plain GEMV with PDL at ``choose_config``'s tile; then the best (kernel,
block_n, block_k, split_k, warps, stages) of a sweep for the plain GEMV with PDL, what the
quantized decode step runs (K tiles of 256 or 512 span several groups of 128; on Hopper also
the kernel with its codes streamed by TMA), from which ``choose_config`` is set.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from bench.quant_kernels import bench_ms, copies, copy_bandwidth
from bench.row_gemv import HIDDEN, INTER, QKV, layer_inputs
from twinfer.quant import QuantScheme, quantize_rtn
from twinfer_kernels.elementwise import rms_norm, silu_and_mul
from twinfer_kernels.quant_matmul import (
    KernelConfig,
    _hopper,
    _num_sms,
    choose_config,
    prepare_quant_weight,
    quant_linear,
)

SCHEMES = {"w4a16-g128": QuantScheme(4, 128, False), "w8a16": QuantScheme(8, -1, True)}
# (kernel, block_n, block_k, split_k, warps, stages); stages matter to the TMA kernel only.
SWEEP = ([("gemv_h2", bn, bk, s, nw, 3) for bn in (32, 64, 128) for bk in (128, 256, 512)
          for s in (1, 2, 4, 8, 16) for nw in (4, 8) if not (bn == 32 and nw == 8)]
         + [("gemv_h2_tma", bn, bk, s, nw, 3) for bn in (32, 64, 128) for bk in (256, 512)
            for s in (1, 2, 4, 8) for nw in (4, 8) if not (bn == 32 and nw == 8)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="no tile sweep")
    ap.add_argument("--schemes", default="w4a16-g128,w8a16")
    ap.add_argument("--kernels", default="gemv_h2,gemv_h2_tma", help="kernels to sweep")
    args = ap.parse_args(argv)
    dt = torch.float16
    bw = copy_bandwidth()
    pdl = torch.cuda.get_device_capability()[0] >= 9
    h, res, norm_w, o, gate_up = layer_inputs(dt)
    # name, (N, K), input, fused kwargs, unfused call
    cases = [
        ("qkv + input norm", (QKV, HIDDEN), h, dict(norm_weight=norm_w),
         lambda w: quant_linear(rms_norm(h, norm_w, 1e-6, res)[0], w)),
        ("o + residual", (HIDDEN, HIDDEN), o, dict(residual=res),
         lambda w: quant_linear(o, w)),
        ("gate/up + post norm", (2 * INTER, HIDDEN), h, dict(norm_weight=norm_w),
         lambda w: quant_linear(rms_norm(h, norm_w, 1e-6, res)[0], w)),
        ("down + SiLU + residual", (HIDDEN, INTER), gate_up, dict(silu=True, residual=res),
         lambda w: quant_linear(silu_and_mul(gate_up), w)),
    ]
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s  "
          f"pdl {pdl}")
    print("| scheme | projection | roofline us | unfused us | plain us | fused us | fused+pdl us "
          "| default+pdl us | best (kernel, block_n, block_k, split, warps, stages) | best us "
          "| % of roofline |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for scheme_name in args.schemes.split(","):
        scheme = SCHEMES[scheme_name]
        for name, (n, k), x, kw, unfused in cases:
            w0 = prepare_quant_weight(quantize_rtn(torch.randn(n, k, device="cuda") * 0.02,
                                                   scheme), dt)
            ws = copies([w0.qweight, w0.scales, w0.zeros, w0.split_counters], w0.nbytes,
                        lambda ts, w0=w0: dataclasses.replace(
                            w0, qweight=ts[0], scales=ts[1], zeros=ts[2],
                            split_counters=ts[3]))
            del w0
            roof = ws[0].nbytes / bw * 1e6
            xin = silu_and_mul(x) if "silu" in kw else x
            t_unfused = bench_ms(unfused, ws) * 1e3
            t_plain = bench_ms(lambda w, xin=xin: quant_linear(xin, w), ws) * 1e3
            t_fused = bench_ms(lambda w, x=x, kw=kw: quant_linear(x, w, **kw), ws) * 1e3
            t_pdl = bench_ms(lambda w, x=x, kw=kw: quant_linear(x, w, **kw, pdl=pdl), ws) * 1e3
            default = choose_config(1, n, k, ws[0], _num_sms(x.device), half2=True,
                                    tma=_hopper(x.device))
            t_default = bench_ms(lambda w, xin=xin, c=default: quant_linear(xin, w, None, c,
                                                                           pdl=pdl), ws) * 1e3
            best = (t_default, (default.kernel, default.block_n, default.block_k,
                                default.split_k, default.num_warps, default.num_stages))
            sweep = [c for c in SWEEP if c[0] in args.kernels.split(",")]
            for kernel, bn, bk, split, nw, st in [] if args.quick else sweep:
                cfg = KernelConfig(kernel, 1, bn, bk, split, nw, st)
                t = bench_ms(lambda w, xin=xin, c=cfg: quant_linear(xin, w, None, c, pdl=pdl),
                             ws) * 1e3
                best = min(best, (t, (kernel, bn, bk, split, nw, st)))
            print(f"| {scheme_name} | {name} | {roof:.1f} | {t_unfused:.1f} | {t_plain:.1f} | "
                  f"{t_fused:.1f} | {t_pdl:.1f} | {t_default:.1f} | {best[1]} | {best[0]:.1f} | "
                  f"{100 * roof / best[0]:.0f}% |", flush=True)
            del ws


if __name__ == "__main__":
    main()
