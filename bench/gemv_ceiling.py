"""How fast could the 4-bit half2 GEMV be with its memory accesses as they are? CUDA only.

    PYTHONPATH=. python -m bench.gemv_ceiling

For each batch-1 projection of a Llama-3.1-8B layer (w4a16, groups of 128) it times a copy of
``twinfer_kernels.half2_gemv``'s 4-bit loop (same loads, same one-tile prefetch, PDL, in-kernel
split-K sum) in two modes:

- ``full``: the kernel's math (checked against ``quant_linear`` first);
- ``loads``: every load kept, the math replaced by XOR-folding the words into the accumulator:
  the speed of the access pattern alone, the ceiling any cheaper unpacking could reach;

and in two weight layouts: the prepared weight's row-major codes (each program reads
``block_n`` rows x ``block_k`` / 2 bytes per K tile, one 128-256 B piece of each row), and a
tile-contiguous copy ([N / block_n, K / block_k, block_n, block_k / 8] words, scales and zeros
[N / block_n, groups, block_n]: each K tile one contiguous read). Times are GPU time per call
from a CUDA graph over enough weight copies to exceed L2 (``bench.quant_kernels``); % is of
the copy bandwidth on the weight's bytes. Prints the best few tiles of each (layout, mode).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from bench.quant_kernels import bench_ms, copies, copy_bandwidth
from bench.row_gemv import HIDDEN, INTER, QKV
from twinfer.quant import QuantScheme, quantize_rtn
from twinfer_kernels.half2_gemv import (
    _DOT_W4_ASM,
    _ZERO_PAIRS_W4_ASM,
    _fence_gpu,
    _tile_x,
    _x_pairs,
)
from twinfer_kernels.pdl import launch_options
from twinfer_kernels.quant_matmul import PreparedQuantWeight, prepare_quant_weight, quant_linear

SHAPES = {"qkv": (QKV, HIDDEN), "o": (HIDDEN, HIDDEN), "gate/up": (2 * INTER, HIDDEN),
          "down": (HIDDEN, INTER)}


@triton.jit
def _tile(w_ptrs, zeros_ptr, scales_ptr, rows, groups, stride_sn, kw,
          GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, TILED: tl.constexpr):
    g = kw * 8 // GROUP_SIZE + groups
    if TILED:  # w_ptrs already point into the program's tiles; zeros / scales [G, BLOCK_N]
        words = tl.load(w_ptrs + kw * BLOCK_N)
        zs = g[None, :] * BLOCK_N + rows[:, None]
    else:
        words = tl.load(w_ptrs + kw)
        zs = rows[:, None] * stride_sn + g[None, :]
    z = tl.load(zeros_ptr + zs).to(tl.int16, bitcast=True).to(tl.int32)
    return words, z, tl.load(scales_ptr + zs)


@triton.jit
def _accumulate(acc2, words, z, s, p0, p1, p2, p3, LOADS_ONLY: tl.constexpr):
    if LOADS_ONLY:
        folded = words ^ (p0 ^ p1 ^ p2 ^ p3)[None, :, :]
        acc2 += folded.to(tl.float32, bitcast=True) + (z + s.to(tl.int32))[:, :, None]
    else:
        x04, x15 = _x_pairs(p0, p2)
        x26, x37 = _x_pairs(p1, p3)
        z_lo, z_hi = tl.inline_asm_elementwise(_ZERO_PAIRS_W4_ASM, "=r,=r,r", [z],
                                               dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        part = tl.inline_asm_elementwise(
            _DOT_W4_ASM, "=r,r,r,r,r,r,r,r",
            [words, x04[None, :, :], x15[None, :, :], x26[None, :, :], x37[None, :, :],
             z_lo[:, :, None], z_hi[:, :, None]], dtype=tl.float32, is_pure=True, pack=1)
        acc2 += part * (s.to(tl.float32) * 64.0)[:, :, None]
    return acc2


@triton.jit
def _ceiling_kernel(x_ptr, qw_ptr, scales_ptr, zeros_ptr, part_ptr, out_ptr, counters_ptr,
                    N, K, k_per_split, num_splits, stride_qn, stride_sn,
                    GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    LOADS_ONLY: tl.constexpr, TILED: tl.constexpr):
    WORDS: tl.constexpr = BLOCK_K // 8
    GPT: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1
    WPG: tl.constexpr = WORDS // GPT
    pid_n, split = tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N
    if TILED:
        qw_ptr += pid_n * BLOCK_N * (K // 8)
        scales_ptr += pid_n * BLOCK_N * (K // GROUP_SIZE)
        zeros_ptr += pid_n * BLOCK_N * (K // GROUP_SIZE)
        rows = tl.arange(0, BLOCK_N)
        stride_qn = WORDS
    groups = tl.arange(0, GPT)
    cols = groups[:, None] * WPG + tl.arange(0, WPG)[None, :]
    w_ptrs = qw_ptr + rows[:, None, None] * stride_qn + cols[None, :, :]
    kw_lo = split * k_per_split // 8
    kw_end = tl.minimum(split * k_per_split + k_per_split, K) // 8
    acc2 = tl.zeros([BLOCK_N, GPT, WPG], tl.float32)
    words, z, s = _tile(w_ptrs, zeros_ptr, scales_ptr, rows, groups, stride_sn, kw_lo,
                        GROUP_SIZE, BLOCK_N, TILED)
    gdc_wait()
    p0, p1, p2, p3 = _tile_x(x_ptr, cols, kw_lo, 8)
    for kw in range(kw_lo, kw_end, WORDS):
        kn = tl.multiple_of(tl.minimum(kw + WORDS, kw_end - WORDS), WORDS)
        words_n, z_n, s_n = _tile(w_ptrs, zeros_ptr, scales_ptr, rows, groups, stride_sn, kn,
                                  GROUP_SIZE, BLOCK_N, TILED)
        p0_n, p1_n, p2_n, p3_n = _tile_x(x_ptr, cols, kn, 8)
        acc2 = _accumulate(acc2, words, z, s, p0, p1, p2, p3, LOADS_ONLY)
        words, z, s, p0, p1, p2, p3 = words_n, z_n, s_n, p0_n, p1_n, p2_n, p3_n
    gdc_launch_dependents()
    acc = tl.sum(tl.sum(acc2, axis=2), axis=1)
    if num_splits > 1:  # as gemv_half2_kernel: the tile's last program adds the partials
        tl.store(part_ptr + split * N + offs_n, acc, mask=offs_n < N)
        _fence_gpu(acc)
        tl.debug_barrier()
        tile = counters_ptr + pid_n
        if tl.atomic_add(tile, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
            acc = tl.zeros([BLOCK_N], tl.float32)
            for i in range(num_splits):
                acc += tl.load(part_ptr + i * N + offs_n, mask=offs_n < N, other=0.0,
                               cache_modifier=".cg")
            tl.store(out_ptr + offs_n, acc.to(tl.float16), mask=offs_n < N)
            tl.atomic_xchg(tile, 0, sem="relaxed", scope="gpu")
    else:
        tl.store(out_ptr + offs_n, acc.to(tl.float16), mask=offs_n < N)


def tile_contiguous(w: PreparedQuantWeight, block_n: int, block_k: int) -> PreparedQuantWeight:
    """``w`` with codes [N / block_n, K / block_k, block_n, block_k / 8] words and scales /
    zeros [N / block_n, groups, block_n] (shapes kept nominal; only _ceiling_kernel reads it)."""
    N, K = w.out_features, w.in_features
    words = w.qweight.view(torch.int32).view(N // block_n, block_n, K // block_k, block_k // 8)
    per_tile = lambda t: t.view(N // block_n, block_n, -1).transpose(1, 2).reshape(N, -1)  # noqa: E731
    return dataclasses.replace(
        w, qweight=words.permute(0, 2, 1, 3).contiguous().view(torch.uint8).view(N, -1),
        scales=per_tile(w.scales).contiguous(), zeros=per_tile(w.zeros).contiguous())


def ceiling_linear(x: torch.Tensor, w: PreparedQuantWeight, block_n: int, block_k: int,
                   split: int, loads_only: bool = False, tiled: bool = False) -> torch.Tensor:
    """One fp16 row x through _ceiling_kernel (``tiled``: ``w`` from tile_contiguous)."""
    N, K = w.out_features, w.in_features
    k_per_split = triton.cdiv(K // block_k, split) * block_k
    num = triton.cdiv(K, k_per_split)
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    part = torch.empty(num, N, dtype=torch.float32, device=x.device)
    words = w.qweight.view(torch.int32)
    _ceiling_kernel[(1, triton.cdiv(N, block_n), num)](
        x.view(torch.int32), words, w.scales, w.zeros, part, out, w.split_counters, N, K,
        k_per_split, num, words.stride(0), w.scales.stride(0), GROUP_SIZE=w.group_size,
        BLOCK_N=block_n, BLOCK_K=block_k, LOADS_ONLY=loads_only, TILED=tiled, num_warps=4,
        num_stages=1, **launch_options(True))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--projections", default=",".join(SHAPES))
    args = ap.parse_args(argv)
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {bw / 1e12:.2f} TB/s")
    print("| projection | roofline us | default us | layout | mode | best tiles: us (% of roofline) "
          "(block_n, block_k, split) |")
    print("|---|---:|---:|---|---|---|")
    for name in args.projections.split(","):
        n, k = SHAPES[name]
        w0 = prepare_quant_weight(quantize_rtn(torch.randn(n, k, device="cuda") * 0.02,
                                               QuantScheme(4, 128, False)), torch.float16)
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        ref = quant_linear(x, w0).float()
        for tiled in (False, True):
            got = ceiling_linear(x, tile_contiguous(w0, 64, 256) if tiled else w0, 64, 256, 2,
                                 tiled=tiled).float()
            torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
        ws = copies([w0.qweight, w0.scales, w0.zeros, w0.split_counters], w0.nbytes,
                    lambda ts, w0=w0: dataclasses.replace(w0, qweight=ts[0], scales=ts[1],
                                                          zeros=ts[2], split_counters=ts[3]))
        del w0
        roof = ws[0].nbytes / bw * 1e6
        default = bench_ms(lambda w, x=x: quant_linear(x, w, pdl=True), ws) * 1e3
        times = {}
        for bn in (32, 64, 128):
            for bk in (256, 512):
                wt = [tile_contiguous(w, bn, bk) for w in ws]
                for split in (1, 2, 4, 8, 16):
                    if (k // bk) // split < 2:
                        continue
                    for tiled in (False, True):
                        for loads_only in (False, True):
                            call = lambda w, a=(x, bn, bk, split, loads_only, tiled): (  # noqa: E731
                                ceiling_linear(a[0], w, *a[1:]))
                            times[tiled, loads_only, (bn, bk, split)] = bench_ms(
                                call, wt if tiled else ws) * 1e3
                del wt
        for tiled in (False, True):
            for loads_only in (False, True):
                best = sorted((t, c) for (ti, lo, c), t in times.items()
                              if (ti, lo) == (tiled, loads_only))[:3]
                tiles = "; ".join(f"{t:.1f} ({100 * roof / t:.0f}%) {c}" for t, c in best)
                print(f"| {name} | {roof:.1f} | {default:.1f} | "
                      f"{'tile-contiguous' if tiled else 'row-major'} | "
                      f"{'loads only' if loads_only else 'full'} | {tiles} |", flush=True)
        del ws


if __name__ == "__main__":
    main()
