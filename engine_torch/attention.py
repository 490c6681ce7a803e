"""Reference attention over the paged KV cache, by gathering each sequence's blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from twinfer.batch import AttentionMetadata


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [num_tokens, num_kv_heads, head_dim] -> their slots in the caches
    [num_blocks, block_size, num_kv_heads, head_dim]."""
    k_cache.view(-1, *k.shape[1:])[slot_mapping] = k
    v_cache.view(-1, *v.shape[1:])[slot_mapping] = v


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float,
                    sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new queries over all its cached keys.

    q: [num_tokens, num_heads, head_dim]; returns the same shape. Query row r of a sequence
    with q_len new tokens and context length ctx sits at position ctx - q_len + r and sees keys
    at positions <= that (and, with a sliding window w, > position - w).
    """
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    start = 0
    for i, (q_len, ctx) in enumerate(zip(meta.query_lens_cpu, meta.context_lens_cpu)):
        blocks = meta.block_tables[i, : -(-ctx // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:ctx]  # [ctx, num_kv_heads, head_dim]
        v = v_cache[blocks].flatten(0, 1)[:ctx]
        k = k.repeat_interleave(group, dim=1)  # GQA: each KV head serves `group` query heads
        v = v.repeat_interleave(group, dim=1)
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= q_pos - k_pos < sliding_window
        o = F.scaled_dot_product_attention(
            q[start:start + q_len].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, scale=scale)
        out[start:start + q_len] = o.transpose(0, 1)
        start += q_len
    return out
