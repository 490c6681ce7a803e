"""Paged decode attention: one new query per sequence over its cached K/V (flash-decoding).

Grid (num_seqs, num_kv_heads, NUM_SPLITS): each program takes the GROUP query heads that
share one KV head (so each K/V tile is read once for all of them) and one contiguous slice
of the context; online softmax inside the slice, then ``_combine_splits_kernel`` merges the
slices by their log-sum-exp. Splitting the context keeps the GPU busy when there are few
sequences and long contexts; with one split the kernel writes the output itself. Sequences
with context 0 (padding rows) produce zeros.

With ``new_kv`` the kernel also does what twinfer_kernels/rotary_kv.py does for a decode step: it
rotates the queries (each program its own copy, in registers) and the program whose slice
holds the newest position rotates that token's key and stores it and its value into the cache
before reading the slice. One launch per layer fewer, which at batch-1 decode is worth more
than the work it moves (bench/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from twinfer.kv_cache_memory import KVCache
from twinfer_kernels.pdl import launch_options
from twinfer_kernels.quantized_kv import (
    cache_tensors,
    hadamard_halves,
    hadamard_rows,
    key_scores,
    load_kv_codes,
    ptx_codes,
    rotates_keys,
    store_kv_halves,
    value_mix,
)


@dataclass
class NewKV:
    """The decode step's new token per sequence, not yet rotated nor cached: k and v [B, Hkv,
    D] (views into the qkv projection are fine), its positions [B], the rotary inverse
    frequencies [D / 2] float32, and its cache slots [B] (-1: a padding row, nothing stored)."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    inv_freq: torch.Tensor
    slot_mapping: torch.Tensor


@triton.jit
def _rotated(ptr, pos, inv_freq_ptr, d, mask, HEAD_DIM: tl.constexpr):
    """Rows at ``ptr`` (+ d along head_dim) rotated by ``pos``: HF's half-split pairs
    (i, i + D/2), in float32, as twinfer_kernels/rotary_kv.py computes them; 0 where not ``mask``."""
    half: tl.constexpr = HEAD_DIM // 2
    angle = pos * tl.load(inv_freq_ptr + d % half)
    x = tl.load(ptr + d, mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(ptr + (d + half) % HEAD_DIM, mask=mask, other=0.0).to(tl.float32)
    sign = tl.where(d < half, -1.0, 1.0)
    return x * tl.cos(angle) + sign * partner * tl.sin(angle)


@triton.jit
def _out_cols(out_cols_ptr, heads, d, mask, HEAD_DIM: tl.constexpr, OUT_COLS: tl.constexpr):
    """Where (head, d) goes in a row of the output: its own column, or the column an
    act-order o_proj reads it from (``out_cols``)."""
    cols = heads * HEAD_DIM + d
    if OUT_COLS:
        cols = tl.load(out_cols_ptr + cols, mask=mask, other=0)
    return cols


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise be multiplied in TF32 on the GPU (10-bit mantissa).
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    part_o_ptr, part_lse_ptr, out_ptr, out_cols_ptr, scale,
    k_new_ptr, v_new_ptr, positions_ptr, inv_freq_ptr, slot_ptr,
    k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr,
    stride_qb, stride_qh, stride_knb, stride_knh, stride_vnb, stride_vnh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_outb,
    NEW_KV: tl.constexpr, PDL: tl.constexpr, OUT_COLS: tl.constexpr, GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, ROTATE_KEYS: tl.constexpr,
    PTX_CODES: tl.constexpr,
):
    if PDL:  # see twinfer_kernels/dense_gemv.py: nothing here is independent of the kernel before
        gdc_wait()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b)
    tiles_per_split = tl.cdiv(tl.cdiv(ctx, BLOCK_N), NUM_SPLITS)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, ctx)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    q_ptrs = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    if NEW_KV:
        pos = tl.load(positions_ptr + b).to(tl.float32)
        q = _rotated(q_ptrs, pos, inv_freq_ptr, d[None, :], gmask[:, None], HEAD_DIM)
        if ROTATE_KEYS:  # into the Hadamard basis the int4 keys live in, from q rounded to
            # the model dtype as rotary_kv rounds it
            q = hadamard_rows(q.to(q_ptr.dtype.element_ty).to(tl.float32))
        q = q.to(q_ptr.dtype.element_ty)
        slot = tl.load(slot_ptr + b)
        if (slot >= 0) & (start <= ctx - 1) & (ctx - 1 < end):  # this slice holds the new token
            if K_BITS == 16:  # (and V_BITS: model-dtype caches come in pairs)
                k_new = _rotated(k_new_ptr + b * stride_knb + kvh * stride_knh, pos,
                                 inv_freq_ptr, d, d < HEAD_DIM, HEAD_DIM)
                v_new = tl.load(v_new_ptr + b * stride_vnb + kvh * stride_vnh + d)
                blk = slot // BLOCK_SIZE
                off = slot % BLOCK_SIZE
                tl.store(k_cache_ptr + blk * stride_kb + off * stride_ks + kvh * stride_kh + d,
                         k_new.to(k_cache_ptr.dtype.element_ty))
                tl.store(v_cache_ptr + blk * stride_vb + off * stride_vs + kvh * stride_vh + d,
                         v_new)
            else:  # quantized rows are written from their rotary halves (quantized_kv.py)
                HALF: tl.constexpr = HEAD_DIM // 2
                i = tl.arange(0, HALF)
                k_new_ptrs = k_new_ptr + b * stride_knb + kvh * stride_knh
                v_new_ptrs = v_new_ptr + b * stride_vnb + kvh * stride_vnh
                k_lo = _rotated(k_new_ptrs, pos, inv_freq_ptr, i, i < HALF, HEAD_DIM)
                k_hi = _rotated(k_new_ptrs, pos, inv_freq_ptr, HALF + i, i < HALF, HEAD_DIM)
                # rounded to the model dtype, as the rotary kernel's keys are
                k_lo = k_lo.to(k_new_ptr.dtype.element_ty).to(tl.float32)
                k_hi = k_hi.to(k_new_ptr.dtype.element_ty).to(tl.float32)
                if ROTATE_KEYS:
                    k_lo, k_hi = hadamard_halves(k_lo, k_hi, HALF)
                v_lo = tl.load(v_new_ptrs + i).to(tl.float32)
                v_hi = tl.load(v_new_ptrs + HALF + i).to(tl.float32)
                blk = slot // BLOCK_SIZE
                off = slot % BLOCK_SIZE
                store_kv_halves(k_cache_ptr, k_scale_ptr, k_min_ptr,
                                blk * stride_kb + off * stride_ks + kvh * stride_kh, i, k_lo,
                                k_hi, K_BITS, HALF)
                store_kv_halves(v_cache_ptr, v_scale_ptr, v_min_ptr,
                                blk * stride_vb + off * stride_vs + kvh * stride_vh, i, v_lo,
                                v_hi, V_BITS, HALF)
        # The stores must be visible to the whole program before it reads its slice.
        tl.debug_barrier()
    else:
        q = tl.load(q_ptrs + d[None, :], mask=gmask[:, None], other=0.0)  # [GROUP_PAD, D]

    if K_BITS == 4:  # for the keys' minima (quantized_kv.key_scores)
        q_sum = tl.sum(q.to(tl.float32), 1)
    else:
        q_sum = 0.0
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        block = tl.load(block_tables_ptr + b * stride_bt + n // BLOCK_SIZE, mask=nmask, other=0)
        off = n % BLOCK_SIZE
        if K_BITS == 16:
            k = tl.load(k_cache_ptr + block[:, None] * stride_kb + off[:, None] * stride_ks
                        + kvh * stride_kh + d[None, :], mask=nmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GROUP_PAD, BLOCK_N]
        else:
            kc, ks, km = load_kv_codes(k_cache_ptr, k_scale_ptr, k_min_ptr, block, off, kvh,
                                       stride_kb, stride_ks, stride_kh, nmask, HEAD_DIM, K_BITS,
                                       q.dtype, PTX_CODES)
            s = key_scores(q, q_sum, kc, ks, km, K_BITS, PRECISION) * scale
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_BITS == 16:
            v = tl.load(v_cache_ptr + block[:, None] * stride_vb + off[:, None] * stride_vs
                        + kvh * stride_vh + d[None, :], mask=nmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        else:
            vc, vs, vm = load_kv_codes(v_cache_ptr, v_scale_ptr, v_min_ptr, block, off, kvh,
                                       stride_vb, stride_vs, stride_vh, nmask, HEAD_DIM, V_BITS,
                                       q.dtype, PTX_CODES)
            acc = acc * alpha[:, None] + value_mix(p, vc, vs, vm, V_BITS, PRECISION)
        m_i = m_new

    if PDL:
        gdc_launch_dependents()
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        cols = _out_cols(out_cols_ptr, heads[:, None], d[None, :], gmask[:, None], HEAD_DIM,
                         OUT_COLS)
        tl.store(out_ptr + b * stride_outb + cols, o.to(out_ptr.dtype.element_ty),
                 mask=gmask[:, None])
    else:
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os
                 + d[None, :], o, mask=gmask[:, None])
        tl.store(part_lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=gmask)


@triton.jit
def _combine_splits_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, out_cols_ptr,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    PDL: tl.constexpr, OUT_COLS: tl.constexpr,
):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + b * stride_lb + h * stride_lh + s, mask=s < NUM_SPLITS,
                  other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)  # 0 for empty splits
    o = tl.load(part_o_ptr + b * stride_ob + h * stride_oh + s[:, None] * stride_os + d[None, :],
                mask=(s < NUM_SPLITS)[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    cols = _out_cols(out_cols_ptr, h, d, d < HEAD_DIM, HEAD_DIM, OUT_COLS)
    tl.store(out_ptr + b * stride_outb + cols, out.to(out_ptr.dtype.element_ty))


def decode_attention(q: torch.Tensor, k_cache: KVCache, v_cache: KVCache,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                     num_splits: int = 1, block_n: int | None = None,
                     new_kv: NewKV | None = None, pdl: bool = False,
                     out_cols: torch.Tensor | None = None, num_warps: int = 4,
                     num_stages: int = 3) -> torch.Tensor:
    """q: [B, H, D]; caches: [num_blocks, block_size, Hkv, D]; block_tables: [B, max_blocks]
    int32; context_lens: [B] int32 (0 for padding rows), counting the new token. Returns
    [B, H, D] in q's dtype. With ``new_kv``, q is taken before rotary embedding and the new
    token's K/V are rotated and cached here (see the module docstring); q is not modified.
    ``pdl``: programmatic dependent launches (CUDA, sm_90+; see twinfer_kernels/dense_gemv.py).
    ``out_cols`` [H * D] int32: the column of each (head, d) in the output's rows, viewed as
    [B, H * D] (act-order o_proj: the inverse of its input permutation, so that it needs no
    gather); None keeps the natural order. Quantized caches (``Int8KVCache``, ``Int4KVCache``)
    are read as codes (twinfer_kernels/quantized_kv.py) and the new token is stored quantized.
    ``block_n`` keys per step: 64 for model-dtype caches, 128 for quantized ones by default;
    ``num_warps`` / ``num_stages``: the launch's. Int4 keys kept in the Hadamard
    basis (``Int4KVCache.rotated``) need q in that basis too: with ``new_kv`` the kernel rotates
    it, without it q must come from ``rotary_and_write_kv`` (which rotates it)."""
    B, H, D = q.shape
    rotate = rotates_keys(k_cache, v_cache)
    k_cache, k_scales, k_mins, k_bits = cache_tensors(k_cache, D)
    v_cache, v_scales, v_mins, v_bits = cache_tensors(v_cache, D)
    _, block_size, Hkv, _ = k_cache.shape
    if k_cache.shape[:3] != v_cache.shape[:3] or (k_bits == 16) != (v_bits == 16):
        raise ValueError(f"K cache {tuple(k_cache.shape)} and V cache {tuple(v_cache.shape)} "
                         "do not pair")
    if H % Hkv:
        raise ValueError(f"num_heads {H} is not a multiple of num_kv_heads {Hkv}")
    if D & (D - 1) or D < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {D}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the caches must be contiguous in head_dim")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if new_kv is not None:
        _check_new_kv(new_kv, B, Hkv, D)
    _check_out_cols(out_cols, H * D)
    if block_n is None:  # the fastest at batch 64 x context 4,096 on an H200 (bench/RESULTS.md)
        block_n = 64 if k_bits == 16 else 128
    block_n = max(16, min(block_n, 128))
    group = H // Hkv
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)  # rows of H * D, contiguous
    # One split: the kernel writes ``out`` and the partials are never touched.
    parts = (B, H, num_splits) if num_splits > 1 else (1, 1, 1)
    part_o = torch.empty(*parts, D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(*parts, dtype=torch.float32, device=q.device)
    kv = new_kv or NewKV(q, q, context_lens, context_lens, context_lens)  # unread stand-ins
    launch = {"PDL": pdl, **launch_options(pdl)}
    _decode_attention_kernel[(B, Hkv, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part_o, part_lse, out,
        out_cols if out_cols is not None else out, scale, kv.k, kv.v, kv.positions, kv.inv_freq, kv.slot_mapping,
        k_scales, v_scales, k_mins, v_mins,
        q.stride(0), q.stride(1), kv.k.stride(0), kv.k.stride(1), kv.v.stride(0),
        kv.v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1), out.stride(0),
        NEW_KV=new_kv is not None, OUT_COLS=out_cols is not None, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, PRECISION=_precision(q.dtype), BLOCK_SIZE=block_size, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, K_BITS=k_bits, V_BITS=v_bits, ROTATE_KEYS=rotate,
        PTX_CODES=ptx_codes(q), num_warps=num_warps,
        num_stages=num_stages, **launch,
    )
    if num_splits > 1:
        _combine_splits_kernel[(B, H)](
            part_o, part_lse, out, out_cols if out_cols is not None else out,
            part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1), out.stride(0),
            HEAD_DIM=D, NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
            OUT_COLS=out_cols is not None, **launch,
        )
    return out


def _check_out_cols(out_cols: torch.Tensor | None, width: int) -> None:
    if out_cols is not None and (out_cols.shape != (width,) or out_cols.dtype != torch.int32):
        raise ValueError(f"out_cols must be int32 [{width}], got {out_cols.dtype} "
                         f"{tuple(out_cols.shape)}")


def _check_new_kv(kv: NewKV, B: int, Hkv: int, D: int) -> None:
    if kv.k.shape != (B, Hkv, D) or kv.v.shape != kv.k.shape:
        raise ValueError(f"new k and v must be [{B}, {Hkv}, {D}], got {tuple(kv.k.shape)} and "
                         f"{tuple(kv.v.shape)}")
    if kv.k.stride(-1) != 1 or kv.v.stride(-1) != 1:
        raise ValueError("new k and v must be contiguous in head_dim")
    if kv.inv_freq.shape != (D // 2,) or kv.inv_freq.dtype != torch.float32:
        raise ValueError("inv_freq must be float32 [head_dim / 2]")
    if kv.positions.shape != (B,) or kv.slot_mapping.shape != (B,):
        raise ValueError(f"positions and slot_mapping must be [{B}]")
