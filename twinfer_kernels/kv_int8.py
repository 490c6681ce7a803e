"""Reading and writing the KV cache inside the attention kernels, in the model dtype or int8.

An int8 cache (``twinfer.kv_cache_memory.Int8KVCache``) holds codes [num_blocks, block_size,
Hkv, D] and one float32 scale per (slot, KV head), contiguous, so a scale's offset is its
row's code offset over D. Writing quantizes a row symmetrically (s = max|x| / 127, as
``quantize_kv``); reading multiplies the codes by their row's scale, in float32, and casts to
the dtype the kernel computes in. The kernels call these with ``KV_INT8`` a constexpr, so
the model-dtype path compiles exactly as before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from twinfer.kv_cache_memory import Int8KVCache, KVCache


@triton.jit
def load_kv_rows(cache_ptr, scale_ptr, block, off, kvh, stride_b, stride_s, stride_h, d, mask,
                 HEAD_DIM: tl.constexpr, KV_INT8: tl.constexpr, MASKED: tl.constexpr = True):
    """Cached rows [N, D] of KV head ``kvh`` at slots (block [N], off [N]) (+ d [D]): in the
    cache's dtype, or dequantized in float32 (the caller casts); zeros where ``mask`` [N] is
    off (checked only when MASKED). The model-dtype path is the plain load the kernels had
    before int8 caches, instruction for instruction."""
    ptrs = (cache_ptr + block[:, None] * stride_b + off[:, None] * stride_s + kvh * stride_h
            + d[None, :])
    if MASKED:
        x = tl.load(ptrs, mask=mask[:, None], other=0.0)
    else:
        x = tl.load(ptrs)
    if KV_INT8:
        rows = (block * stride_b + off * stride_s + kvh * stride_h) // HEAD_DIM
        if MASKED:
            s = tl.load(scale_ptr + rows, mask=mask, other=0.0)
        else:
            s = tl.load(scale_ptr + rows)
        x = x.to(tl.float32) * s[:, None]
    return x


@triton.jit
def store_kv_row(cache_ptr, scale_ptr, row_off, d, x, KV_INT8: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
    """Store one row x [D] (float32) at element offset ``row_off`` of the cache: as is, or
    as int8 codes and its scale."""
    scale = row_scale(tl.max(tl.abs(x), 0))
    store_kv_part(cache_ptr, row_off + d, x, scale, KV_INT8)
    if KV_INT8:
        tl.store(scale_ptr + row_off // HEAD_DIM, scale)


@triton.jit
def row_scale(absmax):
    """An int8 row's scale from its largest |value|."""
    return absmax / 127.0


@triton.jit
def store_kv_part(cache_ptr, offs, x, scale, KV_INT8: tl.constexpr):
    """Store float32 values x at ``offs``: as is, or as int8 codes round(x / scale) (half away
    from zero; torch.round's ties to even differ only on exact halves)."""
    if KV_INT8:
        y = x / tl.where(scale > 0, scale, 1.0)
        codes = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(0.5 - y))
        tl.store(cache_ptr + offs, tl.minimum(tl.maximum(codes, -127.0), 127.0).to(tl.int8))
    else:
        tl.store(cache_ptr + offs, x.to(cache_ptr.dtype.element_ty))


def cache_tensors(cache: KVCache, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(codes or values, scales or a stand-in never read, is int8) for a kernel launch."""
    if isinstance(cache, Int8KVCache):
        if not (cache.codes.is_contiguous() and cache.scales.is_contiguous()) \
                or cache.scales.shape != cache.codes.shape[:-1] or cache.codes.shape[-1] != head_dim:
            raise ValueError("an int8 KV cache must be contiguous codes [blocks, block_size, "
                             f"Hkv, {head_dim}] with scales [blocks, block_size, Hkv]")
        return cache.codes, cache.scales, True
    return cache, cache, False
