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

from twinfer_kernels.decode_attention import _check_out_cols, _out_cols, _precision


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, out_cols_ptr, block_tables_ptr, query_start_ptr,
    context_lens_ptr, tile_seq_ptr, tile_start_ptr, scale, sliding_window,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ot,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    OUT_COLS: tl.constexpr,
):
    tile = tl.program_id(0)
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
    hi = ctx - q_len + tl.minimum(m0 + BLOCK_M, q_len)  # one past the tile's last position
    lo = 0
    if sliding_window > 0:
        lo = tl.maximum(ctx - q_len + m0 - sliding_window + 1, 0) // BLOCK_N * BLOCK_N
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < hi
        block = tl.load(block_tables_ptr + b * stride_bt + n // BLOCK_SIZE, mask=nmask, other=0)
        off = n % BLOCK_SIZE
        k = tl.load(k_cache_ptr + block[:, None] * stride_kb + off[:, None] * stride_ks
                    + kvh * stride_kh + d[None, :], mask=nmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        visible = (n[None, :] <= pos[:, None]) & nmask[None, :] & mmask[:, None]
        if sliding_window > 0:
            visible &= pos[:, None] - n[None, :] < sliding_window
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + block[:, None] * stride_vb + off[:, None] * stride_vs
                    + kvh * stride_vh + d[None, :], mask=nmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    cols = _out_cols(out_cols_ptr, h, d, d < HEAD_DIM, HEAD_DIM, OUT_COLS)
    tl.store(out_ptr + (q_start + m)[:, None] * stride_ot + cols[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mmask[:, None])


def make_tiles(query_lens: list[int], block_m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index, first query row) of every BLOCK_M-row tile of the batch."""
    seqs, starts = [], []
    for i, q_len in enumerate(query_lens):
        for m0 in range(0, q_len, block_m):
            seqs.append(i)
            starts.append(m0)
    return (torch.tensor(seqs, dtype=torch.int32, device=device),
            torch.tensor(starts, dtype=torch.int32, device=device))


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                      context_lens: torch.Tensor, query_lens: list[int], scale: float,
                      sliding_window: int | None = None, block_m: int = 64,
                      block_n: int = 64, out_cols: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, H, D] (T = sum of query_lens); caches [num_blocks, block_size, Hkv, D] already
    holding every position's K/V; block_tables [B, max_blocks] int32; query_start_loc [B + 1]
    int32; context_lens [B] int32. Returns [T, H, D]; ``out_cols``: as decode_attention's."""
    T, H, D = q.shape
    _, block_size, Hkv, Dk = k_cache.shape
    if Dk != D or H % Hkv:
        raise ValueError(f"q [{T}, {H}, {D}] does not fit caches {tuple(k_cache.shape)}")
    if D & (D - 1) or D < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, got {D}")
    if sum(query_lens) != T or len(query_lens) != context_lens.numel():
        raise ValueError("query_lens must cover q and match context_lens")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the caches must be contiguous in head_dim")
    _check_out_cols(out_cols, H * D)
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)  # rows of H * D, contiguous
    tile_seq, tile_start = make_tiles(query_lens, block_m, q.device)
    if tile_seq.numel() == 0:
        return out
    _prefill_attention_kernel[(tile_seq.numel(), H)](
        q, k_cache, v_cache, out, out_cols if out_cols is not None else out, block_tables, query_start_loc, context_lens,
        tile_seq, tile_start, scale, sliding_window or 0,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0),
        block_tables.stride(0),
        GROUP=H // Hkv, HEAD_DIM=D, PRECISION=_precision(q.dtype), BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, OUT_COLS=out_cols is not None,
    )
    return out
