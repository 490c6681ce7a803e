"""Reference attention over the paged KV cache, by gathering each sequence's blocks.

The caches are model-dtype tensors or quantized ones (``Int8KVCache``, ``Int4KVCache``), which
quantize what is stored into them and give it back dequantized, so attention never changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from twinfer.batch import AttentionMetadata
from twinfer.kv_cache_memory import KVCache


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: KVCache,
                   v_cache: KVCache, slot_mapping: torch.Tensor) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim] -> their slots in the caches
    [num_blocks, block_size, num_kv_heads, head_dim]."""
    for x, cache in ((k, k_cache), (v, v_cache)):
        if isinstance(cache, torch.Tensor):
            cache.view(-1, *x.shape[1:])[slot_mapping] = x
        else:
            cache.store(slot_mapping, x)


def paged_attention(q: torch.Tensor, k_cache: KVCache, v_cache: KVCache,
                    meta: AttentionMetadata, scale: float,
                    sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new queries over all its cached keys.

    q: [num_tokens, num_heads, head_dim]; returns the same shape. Query row r of a sequence
    with q_len new tokens and context length ctx sits at position ctx - q_len + r and sees keys
    at positions <= that (and, with a sliding window w, > position - w). Sequences with one
    query (decodes) are computed together, padded to the longest context; the others one by one.
    """
    out = torch.empty_like(q)
    starts = [0]
    for q_len in meta.query_lens_cpu:
        starts.append(starts[-1] + q_len)
    decodes = [i for i, q_len in enumerate(meta.query_lens_cpu) if q_len == 1]
    if decodes:
        rows = torch.tensor([starts[i] for i in decodes], device=q.device)
        out[rows] = _decode_attention(q[rows], k_cache, v_cache, meta, decodes, scale,
                                      sliding_window)
    for i, (q_len, ctx) in enumerate(zip(meta.query_lens_cpu, meta.context_lens_cpu)):
        if q_len == 1:
            continue
        k, v = _gather(k_cache, v_cache, meta.block_tables[i:i + 1], ctx, q.dtype)
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        mask = k_pos <= q_pos  # [q_len, ctx]
        if sliding_window is not None:
            mask &= q_pos - k_pos < sliding_window
        s = slice(starts[i], starts[i] + q_len)
        out[s] = _sdpa(q[s][None], k, v, mask[None], scale)[0]
    return out


def _decode_attention(q: torch.Tensor, k_cache: KVCache, v_cache: KVCache,
                      meta: AttentionMetadata, seqs: list[int], scale: float,
                      sliding_window: int | None) -> torch.Tensor:
    """q: [B, H, D], one query per sequence at position ctx - 1."""
    ctx_lens = [meta.context_lens_cpu[i] for i in seqs]
    max_ctx = max(ctx_lens)
    k, v = _gather(k_cache, v_cache, meta.block_tables[seqs], max_ctx, q.dtype)
    ctx = torch.tensor(ctx_lens, device=q.device)[:, None]
    k_pos = torch.arange(max_ctx, device=q.device)[None, :]
    mask = k_pos < ctx  # [B, max_ctx]: padding beyond each context is masked out
    if sliding_window is not None:
        mask &= ctx - 1 - k_pos < sliding_window
    return _sdpa(q[:, None], k, v, mask[:, None, :], scale)[:, 0]


def _gather(k_cache: KVCache, v_cache: KVCache, block_tables: torch.Tensor, num_tokens: int,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The first num_tokens cached K and V of each table: [B, num_tokens, Hkv, D] in dtype."""
    blocks = block_tables[:, : -(-num_tokens // k_cache.shape[1])].long()

    def read(cache: KVCache) -> torch.Tensor:
        x = cache[blocks] if isinstance(cache, torch.Tensor) else cache.gather(blocks, dtype)
        return x.flatten(1, 2)[:, :num_tokens]

    return read(k_cache), read(v_cache)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
          scale: float) -> torch.Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, Hkv, D], mask broadcastable to [B, Lq, Lk] -> [B, Lq, H, D].

    Each KV head serves H / Hkv query heads (GQA)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask[:, None], scale=scale, enable_gqa=True)
    return o.transpose(1, 2)
