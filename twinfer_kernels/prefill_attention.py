"""Causal attention for variable-length query chunks over the paged KV cache.

Each sequence contributes q_len new queries at positions ctx - q_len .. ctx - 1 whose K/V are
already written to the cache, as are those of every earlier position (a previous chunk, or a
prefix-cache hit). Grid (num_tiles, num_heads): a tile is BLOCK_M queries of one sequence;
it walks the sequence's keys up to its last query's position through the block table, with
an online softmax. Decode rows (q_len = 1) are simply one-row tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from twinfer.device_copy import to_device_async
from twinfer.kv_cache_memory import KVCache
from twinfer_kernels.decode_attention import _check_out_cols, _out_cols, _precision
from twinfer_kernels.quantized_kv import (
    cache_tensors,
    key_scores,
    load_kv_codes,
    ptx_codes,
    value_mix,
)

BLOCK_M = 64  # query rows per tile (make_tiles and the kernel must agree)


@triton.jit
def _load_keys(ptrs, mask, MASKED: tl.constexpr):
    """tl.load of rows; zeros where ``mask`` is off, checked only in MASKED tiles."""
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _attend_keys(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                 k_min_ptr, v_min_ptr, block_tables_ptr, b, kvh, pos, n_lo, n_hi, hi, sliding_window, qk_scale,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                 HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 BLOCK_N: tl.constexpr, MASKED: tl.constexpr, K_BITS: tl.constexpr,
                 V_BITS: tl.constexpr, PTX_CODES: tl.constexpr):
    """Online softmax over keys n_lo .. n_hi (BLOCK_N at a time). Without MASKED every key is
    visible to every query row of the tile (below its first position, no window), so the
    per-element causal mask and its bounds checks are skipped: most of a long prompt's work."""
    d = tl.arange(0, HEAD_DIM)
    if K_BITS == 4:  # for the keys' minima (quantized_kv.key_scores)
        q_sum = tl.sum(q.to(tl.float32), 1)
    else:
        q_sum = 0.0
    for n0 in range(n_lo, n_hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < hi
        kv_offs = n % BLOCK_SIZE
        block = _load_keys(block_tables_ptr + b * stride_bt + n // BLOCK_SIZE, nmask, MASKED)
        if K_BITS == 16:  # the loads as they were before quantized caches, instruction for
            # instruction (the helper's order of address arithmetic compiles differently)
            k_ptrs = (k_cache_ptr + block[:, None] * stride_kb + kv_offs[:, None] * stride_ks
                      + kvh * stride_kh + d[None, :])
            v_ptrs = (v_cache_ptr + block[:, None] * stride_vb + kv_offs[:, None] * stride_vs
                      + kvh * stride_vh + d[None, :])
            k = _load_keys(k_ptrs, nmask[:, None], MASKED)
            # scores in log2 units: exp2 is one instruction, exp is exp2 plus a multiply
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        else:
            kc, ks, km = load_kv_codes(k_cache_ptr, k_scale_ptr, k_min_ptr, block, kv_offs, kvh,
                                       stride_kb, stride_ks, stride_kh, nmask, HEAD_DIM, K_BITS,
                                       q.dtype, PTX_CODES, MASKED)
            s = key_scores(q, q_sum, kc, ks, km, K_BITS, PRECISION) * qk_scale
        if MASKED:
            visible = (n[None, :] <= pos[:, None]) & nmask[None, :]
            if sliding_window > 0:
                visible &= pos[:, None] - n[None, :] < sliding_window
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_BITS == 16:
            v = _load_keys(v_ptrs, nmask[:, None], MASKED)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        else:
            vc, vs, vm = load_kv_codes(v_cache_ptr, v_scale_ptr, v_min_ptr, block, kv_offs, kvh,
                                       stride_vb, stride_vs, stride_vh, nmask, HEAD_DIM, V_BITS,
                                       q.dtype, PTX_CODES, MASKED)
            acc = acc * alpha[:, None] + value_mix(p, vc, vs, vm, V_BITS, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, out_cols_ptr, block_tables_ptr, query_start_ptr,
    context_lens_ptr, tile_seq_ptr, tile_start_ptr, scale, sliding_window,
    k_scale_ptr, v_scale_ptr, k_min_ptr, v_min_ptr,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ot,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    OUT_COLS: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
    PTX_CODES: tl.constexpr,
):
    # Tiles run last to first: make_tiles lists each sequence's tiles in query order, and the
    # later ones attend to more keys, so starting them first shortens the tail of the grid.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    b = tl.load(tile_seq_ptr + tile)
    m0 = tl.load(tile_start_ptr + tile)
    q_start = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_start
    ctx = tl.load(context_lens_ptr + b)

    m = m0 + tl.arange(0, BLOCK_M)
    mmask = m < q_len
    pos = ctx - q_len + m  # absolute position of each query row
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + m)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=mmask[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qk_scale = scale * 1.4426950408889634  # log2(e)
    first = ctx - q_len + m0  # the tile's first query position
    hi = ctx - q_len + tl.minimum(m0 + BLOCK_M, q_len)  # one past the tile's last position
    lo = 0
    full = (first + 1) // BLOCK_N * BLOCK_N  # keys every row of the tile sees, whole blocks
    if sliding_window > 0:
        lo = tl.maximum(first - sliding_window + 1, 0) // BLOCK_N * BLOCK_N
        full = lo
    acc, l_i, m_i = _attend_keys(
        acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, k_min_ptr,
        v_min_ptr, block_tables_ptr,
        b, kvh, pos, lo, full, hi, sliding_window, qk_scale, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_bt, HEAD_DIM, PRECISION, BLOCK_SIZE, BLOCK_N,
        False, K_BITS, V_BITS, PTX_CODES)
    acc, l_i, m_i = _attend_keys(
        acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, k_min_ptr,
        v_min_ptr, block_tables_ptr,
        b, kvh, pos, full, hi, hi, sliding_window, qk_scale, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_bt, HEAD_DIM, PRECISION, BLOCK_SIZE, BLOCK_N,
        True, K_BITS, V_BITS, PTX_CODES)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    cols = _out_cols(out_cols_ptr, h, d, d < HEAD_DIM, HEAD_DIM, OUT_COLS)
    tl.store(out_ptr + (q_start + m)[:, None] * stride_ot + cols[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mmask[:, None])


def make_tiles(query_lens: list[int], block_m: int, device: torch.device) -> torch.Tensor:
    """[2, num_tiles] int32: (sequence index, first query row) of every ``block_m``-row tile of
    the batch. Every layer's attention uses the same tiles, so a forward pass makes them once
    (a copy from the host per layer would stall the launches)."""
    tiles = [(i, m0) for i, q_len in enumerate(query_lens) for m0 in range(0, q_len, block_m)]
    n = len(tiles)
    # Rows padded to a multiple of 4 entries, so that the second row (the kernel's
    # tile_start_ptr) starts 16-byte aligned whatever the tile count: Triton specializes
    # pointers on that alignment, and a count that is not a multiple of 4 compiled a second
    # variant of the kernel, ~0.3-1.4 s of JIT in the middle of serving (fifteenth session's
    # H100 probe, bench/RESULTS.md).
    padded = torch.zeros(2, -(-n // 4) * 4, dtype=torch.int32)
    padded[:, :n] = torch.tensor(tiles, dtype=torch.int32).view(-1, 2).T
    return to_device_async(padded, device)[:, :n]


def prefill_attention(q: torch.Tensor, k_cache: KVCache, v_cache: KVCache,
                      block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                      context_lens: torch.Tensor, query_lens: list[int], scale: float,
                      sliding_window: int | None = None, block_m: int = BLOCK_M,
                      block_n: int = 64, out_cols: torch.Tensor | None = None,
                      num_warps: int = 4, num_stages: int = 2,
                      tiles: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, H, D] (T = sum of query_lens); caches [num_blocks, block_size, Hkv, D] already
    holding every position's K/V; block_tables [B, max_blocks] int32; query_start_loc [B + 1]
    int32; context_lens [B] int32. Returns [T, H, D]; ``out_cols``: as decode_attention's;
    ``tiles``: ``make_tiles(query_lens, block_m)``, made here if not given. The default tile
    (64 x 64, 4 warps, 2 stages) was the fastest of ten at 2,048 and 8,192-token prompts on an
    H200 (bench/RESULTS.md). Quantized caches (``Int8KVCache``, ``Int4KVCache``) are read
    as codes (twinfer_kernels/quantized_kv.py)."""
    T, H, D = q.shape
    k_cache, k_scales, k_mins, k_bits = cache_tensors(k_cache, D)
    v_cache, v_scales, v_mins, v_bits = cache_tensors(v_cache, D)
    _, block_size, Hkv, _ = k_cache.shape
    if H % Hkv or k_cache.shape[:3] != v_cache.shape[:3] or (k_bits == 16) != (v_bits == 16):
        raise ValueError(f"q [{T}, {H}, {D}] does not fit caches {tuple(k_cache.shape)} / "
                         f"{tuple(v_cache.shape)}")
    if D & (D - 1) or D < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {D}")
    if sum(query_lens) != T or len(query_lens) != context_lens.numel():
        raise ValueError("query_lens must cover q and match context_lens")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the caches must be contiguous in head_dim")
    _check_out_cols(out_cols, H * D)
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)  # rows of H * D, contiguous
    if tiles is None:
        tiles = make_tiles(query_lens, block_m, q.device)
    if tiles.shape[1] == 0:
        return out
    tile_seq, tile_start = tiles
    _prefill_attention_kernel[(tiles.shape[1], H)](
        q, k_cache, v_cache, out, out_cols if out_cols is not None else out, block_tables, query_start_loc, context_lens,
        tile_seq, tile_start, scale, sliding_window or 0, k_scales, v_scales,
        k_mins, v_mins,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0),
        block_tables.stride(0),
        GROUP=H // Hkv, HEAD_DIM=D, PRECISION=_precision(q.dtype), BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, OUT_COLS=out_cols is not None, K_BITS=k_bits,
        V_BITS=v_bits, PTX_CODES=ptx_codes(q),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
