"""Reading and writing quantized KV caches inside the attention kernels (int8 / int4 codes:
``twinfer.kv_cache_memory``'s ``Int8KVCache`` / ``Int4KVCache``).

A quantized cache holds one row of codes per (slot, KV head), contiguous, and float32
parameters per row, so a row's parameters sit at its code offset over the row's width in
codes (D for int8, D/2 bytes for int4). Writing quantizes a row as ``quantize_kv`` /
``quantize_kv_int4`` do (halves round away from zero where torch rounds to even: a code
apart on exact ties only). Reading never dequantizes a tile: attention takes the codes
converted to its dtype and applies each row's scale and minimum to the scores and to the
probabilities (``load_kv_codes``, ``key_scores``, ``value_mix``). The kernels pass each
cache's bits (``K_BITS``, ``V_BITS``: 16 for the model dtype, 8, 4) as constexprs, so their
model-dtype path compiles to the instructions it had before quantized caches. Int4 keys live
in a Hadamard basis (``ROTATE_KEYS``): the kernels that apply rotary embedding also multiply q
and the new keys by H (``hadamard_halves``, ``hadamard_rows``), so attention reads keys and
queries in the same basis and never un-rotates anything.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from twinfer.kv_cache_memory import Int4KVCache, Int8KVCache, KVCache

# Codes to fp16 without conversion instructions (which issue at a quarter of the ALU rate, and
# two per element made int8 attention slower than fp16's): each byte goes under the exponent
# of 1024 (0x64XX is the fp16 1024 + XX), and one packed subtraction per two codes removes the
# offset. Four codes in one 32-bit register ($2) become four fp16 in two ($0, $1), in order.
# int8: c ^ 0x80 is c + 128 as an unsigned byte, so the offset is 1152 (0x6480).
_I8_TO_F16_ASM = tl.constexpr("""{
.reg .b32 t, m;
xor.b32 t, $2, 0x80808080;
mov.b32 m, 0x64646464;
prmt.b32 $0, t, m, 0x4140;
prmt.b32 $1, t, m, 0x4342;
mov.b32 m, 0x64806480;
sub.f16x2 $0, $0, m;
sub.f16x2 $1, $1, m;
}""")
# int4: the low nibbles of four bytes; then the high ones (the word shifted right by 4).
_U4_LO_TO_F16_ASM = tl.constexpr("""{
.reg .b32 z, k, m;
mov.b32 z, 0;
mov.b32 k, 0x000F000F;
mov.b32 m, 0x64006400;
prmt.b32 $0, $2, z, 0x4140;
prmt.b32 $1, $2, z, 0x4342;
lop3.b32 $0, $0, k, m, 0xEA;
lop3.b32 $1, $1, k, m, 0xEA;
sub.f16x2 $0, $0, m;
sub.f16x2 $1, $1, m;
}""")
_U4_HI_TO_F16_ASM = tl.constexpr("""{
.reg .b32 w, z, k, m;
shr.b32 w, $2, 4;
mov.b32 z, 0;
mov.b32 k, 0x000F000F;
mov.b32 m, 0x64006400;
prmt.b32 $0, w, z, 0x4140;
prmt.b32 $1, w, z, 0x4342;
lop3.b32 $0, $0, k, m, 0xEA;
lop3.b32 $1, $1, k, m, 0xEA;
sub.f16x2 $0, $0, m;
sub.f16x2 $1, $1, m;
}""")


@triton.jit
def load_kv_codes(cache_ptr, scale_ptr, min_ptr, block, off, kvh, stride_b, stride_s, stride_h,
                  mask, HEAD_DIM: tl.constexpr, KV_BITS: tl.constexpr, DTYPE: tl.constexpr,
                  PTX_CODES: tl.constexpr, MASKED: tl.constexpr = True):
    """A quantized tile of KV head ``kvh`` at slots (block [N], off [N]) as it is stored: the
    codes [N, D] in DTYPE (small integers, exact in every float dtype) and each row's scale
    and minimum [N] (float32; minima 0 for int8), so row n is codes[n] * scale[n] + min[n].
    Zeros where ``mask`` [N] is off (checked only when MASKED). The attention kernels apply
    the parameters to the scores and the probabilities (``key_scores``, ``value_mix``), not to
    the tile: a per-row factor passes through the dot, and converting codes is all the
    per-element work left (dequantizing the tile in float32 made int8 attention slower than
    fp16's; bench/RESULTS.md). ``PTX_CODES`` (fp16 on CUDA): codes become fp16 by byte
    permutes and a packed subtraction (the ``_*_TO_F16_ASM`` sequences), not by conversion
    instructions."""
    base = block * stride_b + off * stride_s + kvh * stride_h
    rows = base // (HEAD_DIM * KV_BITS // 8)
    if KV_BITS == 8:
        d = tl.arange(0, HEAD_DIM)
        x = _load_masked(cache_ptr + base[:, None] + d[None, :], mask[:, None], MASKED)
        if PTX_CODES:
            codes = tl.inline_asm_elementwise(_I8_TO_F16_ASM, "=r,=r,r", [x], dtype=tl.float16,
                                              is_pure=True, pack=4)
        else:
            codes = x.to(DTYPE)
    else:  # byte i holds dimension i's code (low nibble) and dimension HALF + i's (high)
        HALF: tl.constexpr = HEAD_DIM // 2
        i = tl.arange(0, HALF)
        x = _load_masked(cache_ptr + base[:, None] + i[None, :], mask[:, None], MASKED)
        if PTX_CODES:
            lo = tl.inline_asm_elementwise(_U4_LO_TO_F16_ASM, "=r,=r,r", [x], dtype=tl.float16,
                                           is_pure=True, pack=4)
            hi = tl.inline_asm_elementwise(_U4_HI_TO_F16_ASM, "=r,=r,r", [x], dtype=tl.float16,
                                           is_pure=True, pack=4)
        else:
            lo, hi = (x & 15).to(DTYPE), (x >> 4).to(DTYPE)
        both = tl.join(lo, hi)  # [N, HALF, 2]
        codes = tl.reshape(tl.permute(both, (0, 2, 1)), (x.shape[0], HEAD_DIM))
    scales = _load_masked(scale_ptr + rows, mask, MASKED)
    if KV_BITS == 4:
        mins = _load_masked(min_ptr + rows, mask, MASKED)
    else:
        mins = tl.zeros_like(scales)
    return codes, scales, mins


@triton.jit
def _load_masked(ptrs, mask, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def key_scores(q, q_sum, codes, scales, mins, KV_BITS: tl.constexpr, PRECISION: tl.constexpr):
    """q [M, D] against the keys codes * scale + min of ``load_kv_codes``: [M, N] float32,
    as q . (c_n s_n + m_n) = s_n (q . c_n) + m_n sum(q) (``q_sum`` [M] float32)."""
    s = tl.dot(q, tl.trans(codes), input_precision=PRECISION) * scales[None, :]
    if KV_BITS == 4:
        s += q_sum[:, None] * mins[None, :]
    return s


@triton.jit
def value_mix(p, codes, scales, mins, KV_BITS: tl.constexpr, PRECISION: tl.constexpr):
    """sum_n p[:, n] (codes[n] * scale[n] + min[n]) for probabilities p [M, N] (float32) and
    the values of ``load_kv_codes``: [M, D] float32. The scales go into p, divided by the
    tile's largest so that p stays in [0, 1] when it is rounded to the codes' dtype (a small
    scale would otherwise push it into fp16's subnormals)."""
    top = tl.max(scales, 0)
    top = tl.where(top > 0, top, 1.0)
    weights = (p * (scales / top)[None, :]).to(codes.dtype)
    mix = tl.dot(weights, codes, input_precision=PRECISION) * top
    if KV_BITS == 4:
        mix += tl.sum(p * mins[None, :], 1)[:, None]
    return mix


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
def fwht_rows(x):
    """The unnormalised Sylvester Hadamard transform of each row of x [M, N] (N a power of two),
    by butterflies (a, b) -> (a + b, a - b) at strides 1, 2, .., N/2: N log2(N) adds per row
    and no matrix (generating the N x N signs in every program cost registers and time: the
    fused decode step spilled; bench/RESULTS.md)."""
    M: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    for stage in tl.static_range(16):  # N <= 2^16; stride h = 2^stage
        if (1 << stage) < N:
            pairs = tl.permute(tl.reshape(x, (M, N // (2 << stage), 2, 1 << stage)), (0, 1, 3, 2))
            a, b = tl.split(pairs)  # [M, N / 2h, h] each: the pairs' first and second elements
            x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (M, N))
    return x


@triton.jit
def hadamard_halves(lo, hi, HALF: tl.constexpr):
    """The halves of x H (H the orthonormal Hadamard matrix of size 2 HALF) from x's halves
    lo = x[:HALF], hi = x[HALF:] (float32): H = [[S, S], [S, -S]] / sqrt(2 HALF), S the
    unnormalised matrix of size HALF, so x H = [(lo + hi) S, (lo - hi) S] / sqrt(2 HALF)."""
    norm = 1.0 / tl.sqrt(2.0 * HALF)
    both = fwht_rows(tl.join(lo + hi, lo - hi).trans())  # [2, HALF]
    first, second = tl.split(both.trans())
    return first * norm, second * norm


@triton.jit
def hadamard_rows(x):
    """x [M, D] (float32, D a power of two) times the orthonormal Hadamard matrix of size D."""
    return fwht_rows(x) * (1.0 / tl.sqrt(1.0 * x.shape[1]))


@triton.jit
def _round_clamped(y, lo, hi):
    """y rounded to the nearest integer (halves away from zero), clamped to [lo, hi]."""
    r = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(0.5 - y))
    return tl.minimum(tl.maximum(r, lo), hi)


def ptx_codes(q: torch.Tensor) -> bool:
    """Whether the codes may become fp16 by PTX (``load_kv_codes``' PTX_CODES): fp16 queries
    on CUDA (the interpreter runs no PTX; other dtypes convert)."""
    return q.dtype == torch.float16 and q.is_cuda


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
