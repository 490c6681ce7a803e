"""Rotary embedding of q and k fused with writing k and v into their KV-cache slots.

One launch per layer instead of three (rotate q, rotate k, store k/v): at batch-1 decode every
layer is a dozen tiny kernels, and their launch gaps, not their bytes, set the step time.
Grid (num_tokens, num_heads + num_kv_heads): programs h < num_heads rotate query head h in
place; the others rotate key head h - num_heads and store it, with the matching value head,
at the token's slot (slot -1 marks a padding row: nothing is written).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from twinfer.kv_cache_memory import KVCache
from twinfer_kernels.quantized_kv import (
    cache_tensors,
    hadamard_halves,
    rotates_keys,
    store_kv_halves,
)


@triton.jit
def _rotary_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, inv_freq_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cs, stride_ch, stride_vcs, stride_vch,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    ROTATE_KEYS: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, HALF)
    angle = tl.load(positions_ptr + t).to(tl.float32) * tl.load(inv_freq_ptr + i)
    cos, sin = tl.cos(angle), tl.sin(angle)
    is_q = h < NUM_HEADS
    kvh = h - NUM_HEADS
    base = tl.where(is_q, q_ptr + t * stride_qt + h * stride_qh,
                    k_ptr + t * stride_kt + kvh * stride_kh)
    x1 = tl.load(base + i).to(tl.float32)
    x2 = tl.load(base + HALF + i).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty)
    if ROTATE_KEYS:  # q and k into the Hadamard basis the int4 keys live in
        y1, y2 = hadamard_halves(y1.to(tl.float32), y2.to(tl.float32), HALF)
        y1, y2 = y1.to(q_ptr.dtype.element_ty), y2.to(q_ptr.dtype.element_ty)
    tl.store(base + i, y1)
    tl.store(base + HALF + i, y2)
    if not is_q:
        slot = tl.load(slot_ptr + t)
        if slot >= 0:
            dst = slot * stride_cs + kvh * stride_ch
            if K_BITS == 16:  # (and V_BITS: model-dtype caches come in pairs)
                tl.store(k_cache_ptr + dst + i, y1)
                tl.store(k_cache_ptr + dst + HALF + i, y2)
                v = v_ptr + t * stride_vt + kvh * stride_vh
                tl.store(v_cache_ptr + dst + i, tl.load(v + i))
                tl.store(v_cache_ptr + dst + HALF + i, tl.load(v + HALF + i))
            else:  # quantized: each row from its halves (twinfer_kernels/quantized_kv.py)
                v = v_ptr + t * stride_vt + kvh * stride_vh
                k1, k2 = y1.to(tl.float32), y2.to(tl.float32)  # the values q's kernel rounds
                v1, v2 = tl.load(v + i).to(tl.float32), tl.load(v + HALF + i).to(tl.float32)
                store_kv_halves(k_cache_ptr, k_scale_ptr, k_min_ptr, dst, i, k1, k2, K_BITS,
                                HALF)
                store_kv_halves(v_cache_ptr, v_scale_ptr, v_min_ptr,
                                slot * stride_vcs + kvh * stride_vch, i, v1, v2, V_BITS, HALF)


def rotary_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        positions: torch.Tensor, inv_freq: torch.Tensor,
                        k_cache: KVCache, v_cache: KVCache,
                        slot_mapping: torch.Tensor) -> None:
    """Rotate q [T, H, D] and k [T, Hkv, D] in place by positions[t] * inv_freq (HF half-split
    pairs (i, i + D/2)), then store k and v [T, Hkv, D] at their slots of the caches
    [num_blocks, block_size, Hkv, D] (quantized caches: as codes and their parameters; int4
    keys kept in the Hadamard basis: then q and k are also multiplied by H in place)."""
    T, H, D = q.shape
    Hkv = k.shape[1]
    rotate = rotates_keys(k_cache, v_cache)
    k_cache, k_scales, k_mins, k_bits = cache_tensors(k_cache, D)
    v_cache, v_scales, v_mins, v_bits = cache_tensors(v_cache, D)
    if k.shape != (T, Hkv, D) or v.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} differ")
    if any(x.stride(-1) != 1 for x in (q, k, v)) or not k_cache.is_contiguous() \
            or not v_cache.is_contiguous() or k_cache.shape[2] != Hkv \
            or k_cache.shape[:3] != v_cache.shape[:3] or (k_bits == 16) != (v_bits == 16) \
            or (k_bits == 16 and k_cache.shape[3] != D):
        raise ValueError("q, k, v must be contiguous in head_dim and the caches contiguous "
                         "[num_blocks, block_size, Hkv, D]")
    if inv_freq.shape != (D // 2,) or inv_freq.dtype != torch.float32:
        raise ValueError("inv_freq must be float32 [head_dim / 2]")
    if T == 0:
        return
    _rotary_write_kv_kernel[(T, H + Hkv)](
        q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping, k_scales, v_scales,
        k_mins, v_mins,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=H, HALF=D // 2, K_BITS=k_bits, V_BITS=v_bits,
        ROTATE_KEYS=rotate)
