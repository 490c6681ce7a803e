"""Reading and writing the KV cache inside the attention kernels: in the model dtype, or as
int8 / int4 codes (``twinfer.kv_cache_memory``'s ``Int8KVCache`` / ``Int4KVCache``).

A quantized cache holds one row of codes per (slot, KV head), contiguous, and float32
parameters per row, so a row's parameters sit at its code offset over the row's width in
codes (D for int8, D/2 bytes for int4). Writing quantizes a row as ``quantize_kv`` /
``quantize_kv_int4`` do (halves round away from zero where torch rounds to even: a code
apart on exact ties only); reading dequantizes in float32 and the caller casts to the dtype it
computes in. The kernels pass each cache's bits (``K_BITS``, ``V_BITS``: 16 for the model dtype,
8, 4) as constexprs, so their model-dtype path compiles to the instructions it had before
quantized caches. Int4 keys live
in a Hadamard basis (``ROTATE_KEYS``): the kernels that apply rotary embedding also multiply q
and the new keys by H (``hadamard_halves``, ``hadamard_rows``), so attention reads keys and
queries in the same basis and never un-rotates anything.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from twinfer.kv_cache_memory import Int4KVCache, Int8KVCache, KVCache


@triton.jit
def load_kv_rows(cache_ptr, scale_ptr, min_ptr, block, off, kvh, stride_b, stride_s, stride_h,
                 d, mask, HEAD_DIM: tl.constexpr, KV_BITS: tl.constexpr,
                 MASKED: tl.constexpr = True):
    """Cached rows [N, D] of KV head ``kvh`` at slots (block [N], off [N]) (+ d [D]): in the
    cache's dtype (KV_BITS 16) or dequantized in float32; zeros where ``mask`` [N] is off
    (checked only when MASKED). Strides are the code tensor's."""
    HALF: tl.constexpr = HEAD_DIM // 2
    if KV_BITS == 4:  # byte d % (D/2) holds d's code in its low (d < D/2) or high nibble
        cols = d % HALF
    else:
        cols = d
    ptrs = (cache_ptr + block[:, None] * stride_b + off[:, None] * stride_s + kvh * stride_h
            + cols[None, :])
    if MASKED:
        x = tl.load(ptrs, mask=mask[:, None], other=0.0)
    else:
        x = tl.load(ptrs)
    if KV_BITS != 16:
        rows = (block * stride_b + off * stride_s + kvh * stride_h) // (HEAD_DIM * KV_BITS // 8)
        if MASKED:
            s = tl.load(scale_ptr + rows, mask=mask, other=0.0)
        else:
            s = tl.load(scale_ptr + rows)
        if KV_BITS == 8:
            x = x.to(tl.float32) * s[:, None]
        else:
            if MASKED:
                lo = tl.load(min_ptr + rows, mask=mask, other=0.0)
            else:
                lo = tl.load(min_ptr + rows)
            codes = (x.to(tl.int32) >> ((d // HALF) * 4)[None, :]) & 15
            x = codes.to(tl.float32) * s[:, None] + lo[:, None]
    return x


@triton.jit
def store_kv_halves(cache_ptr, scale_ptr, min_ptr, row_off, i, lo, hi, KV_BITS: tl.constexpr,
                    HALF: tl.constexpr):
    """Quantize one row given as its halves lo = x[i], hi = x[HALF + i] (float32, i =
    arange(HALF)) into the codes at element offset ``row_off`` and its parameters (KV_BITS 8
    or 4)."""
    if KV_BITS == 8:
        scale = tl.maximum(tl.max(tl.abs(lo), 0), tl.max(tl.abs(hi), 0)) / 127.0
        safe = tl.where(scale > 0, scale, 1.0)
        tl.store(cache_ptr + row_off + i, _round_clamped(lo / safe, -127.0, 127.0).to(tl.int8))
        tl.store(cache_ptr + row_off + HALF + i,
                 _round_clamped(hi / safe, -127.0, 127.0).to(tl.int8))
        tl.store(scale_ptr + row_off // (2 * HALF), scale)
    else:
        least = tl.minimum(tl.min(lo, 0), tl.min(hi, 0))
        scale = (tl.maximum(tl.max(lo, 0), tl.max(hi, 0)) - least) / 15.0
        safe = tl.where(scale > 0, scale, 1.0)
        q_lo = _round_clamped((lo - least) / safe, 0.0, 15.0).to(tl.int32)
        q_hi = _round_clamped((hi - least) / safe, 0.0, 15.0).to(tl.int32)
        tl.store(cache_ptr + row_off + i, (q_lo | (q_hi << 4)).to(tl.uint8))
        tl.store(scale_ptr + row_off // HALF, scale)
        tl.store(min_ptr + row_off // HALF, least)


@triton.jit
def _hadamard_signs(R: tl.constexpr, C: tl.constexpr):
    """The [R, C] corner of the unnormalised Sylvester matrix: (-1)^popcount(i & j)."""
    p = tl.arange(0, R)[:, None] & tl.arange(0, C)[None, :]
    p = p ^ (p >> 8)
    p = p ^ (p >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    return 1.0 - 2.0 * (p & 1).to(tl.float32)


@triton.jit
def hadamard_halves(lo, hi, HALF: tl.constexpr):
    """The halves of x H (H the orthonormal Hadamard matrix of size 2 HALF) from x's halves
    lo = x[:HALF], hi = x[HALF:] (float32): H = [[S, S], [S, -S]] / sqrt(2 HALF), S the
    unnormalised matrix of size HALF, so x H = [(lo + hi) S, (lo - hi) S] / sqrt(2 HALF)."""
    s = _hadamard_signs(HALF, HALF)
    norm = 1.0 / tl.sqrt(2.0 * HALF)
    return (tl.sum((lo + hi)[:, None] * s, 0) * norm,
            tl.sum((lo - hi)[:, None] * s, 0) * norm)


@triton.jit
def hadamard_rows(x, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """x [M, D] (M >= 16) times the orthonormal Hadamard matrix of size D, in float32, on the
    tensor cores in x's dtype (H's entries +-1/sqrt(D) round to fp16 within 2^-11)."""
    h = _hadamard_signs(HEAD_DIM, HEAD_DIM) * (1.0 / tl.sqrt(1.0 * HEAD_DIM))
    return tl.dot(x, h.to(x.dtype), input_precision=PRECISION)


@triton.jit
def _round_clamped(y, lo, hi):
    """y rounded to the nearest integer (halves away from zero), clamped to [lo, hi]."""
    r = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(0.5 - y))
    return tl.minimum(tl.maximum(r, lo), hi)


def rotates_keys(k_cache: KVCache, v_cache: KVCache) -> bool:
    """Whether the keys are kept in the Hadamard basis (so the kernels rotate q and new keys);
    values never are."""
    if isinstance(v_cache, Int4KVCache) and v_cache.rotated:
        raise ValueError("a value cache cannot be rotated: only keys are kept as k H")
    return isinstance(k_cache, Int4KVCache) and k_cache.rotated


def cache_tensors(cache: KVCache, head_dim: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(codes or values, scales, minima, KV_BITS) for a kernel launch; the parameters a cache
    lacks are stand-ins the kernel never reads."""
    if isinstance(cache, torch.Tensor):
        return cache, cache, cache, 16
    bits = 8 if isinstance(cache, Int8KVCache) else 4
    width = head_dim * bits // 8
    mins = cache.mins if isinstance(cache, Int4KVCache) else cache.scales
    if not (cache.codes.is_contiguous() and cache.scales.is_contiguous()
            and mins.is_contiguous()) or cache.codes.shape[-1] != width \
            or cache.scales.shape != cache.codes.shape[:-1] or mins.shape != cache.scales.shape:
        raise ValueError(f"an int{bits} KV cache must be contiguous codes [blocks, block_size, "
                         f"Hkv, {width}] with float32 parameters [blocks, block_size, Hkv]")
    return cache.codes, cache.scales, mins, bits
