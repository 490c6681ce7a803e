"""The reference Llama-family forward pass (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3).

    x = embed(tokens)
    for each layer:
        h = rms_norm(x);  q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv)
        q, k = rms_norm per head (Qwen3 only);  q, k = rotary(q, k, positions)
        cache[slots] = k, v;  x = x + attention(q, cache) Wo
        h = rms_norm(x);  x = x + (silu(h Wgate) * h Wup) Wdown
    logits = rms_norm(x) Wlm_head   (Wlm_head = embed when tied)

Shapes in comments: T tokens in the flattened batch, H query heads, Hkv KV heads, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine_torch.attention import paged_attention, write_kv_cache
from engine_torch.layers import (
    Linear,
    apply_rotary,
    make_linear,
    rms_norm,
    rope_inv_freq,
    rotary_cos_sin,
)
from twinfer.batch import AttentionMetadata
from twinfer.kv_cache_memory import KVCache
from twinfer.weights import ModelWeights


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    post_attention_norm: torch.Tensor
    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear


class LlamaModel:
    """Weights on one device in one dtype, and the forward pass over a paged KV cache."""

    def __init__(self, weights: ModelWeights, device: torch.device | str, dtype: torch.dtype):
        cfg = self.config = weights.config
        self.dtype = dtype

        def tensor(name: str) -> torch.Tensor:
            return weights.get(name).to(device=device, dtype=dtype, copy=True)

        def linear(name: str, bias: bool = False) -> Linear:
            return make_linear(weights, name, device, dtype, bias)

        self.embed_tokens = tensor("model.embed_tokens.weight")  # [vocab, hidden]
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(DecoderLayer(
                input_norm=tensor(p + "input_layernorm.weight"),
                q_proj=linear(p + "self_attn.q_proj", cfg.qkv_bias),
                k_proj=linear(p + "self_attn.k_proj", cfg.qkv_bias),
                v_proj=linear(p + "self_attn.v_proj", cfg.qkv_bias),
                o_proj=linear(p + "self_attn.o_proj"),
                q_norm=tensor(p + "self_attn.q_norm.weight") if cfg.qk_norm else None,
                k_norm=tensor(p + "self_attn.k_norm.weight") if cfg.qk_norm else None,
                post_attention_norm=tensor(p + "post_attention_layernorm.weight"),
                gate_proj=linear(p + "mlp.gate_proj"),
                up_proj=linear(p + "mlp.up_proj"),
                down_proj=linear(p + "mlp.down_proj"),
            ))
        self.norm = tensor("model.norm.weight")
        self.lm_head = (self.embed_tokens if cfg.tie_word_embeddings
                        else tensor("lm_head.weight"))  # [vocab, hidden]
        self.inv_freq = rope_inv_freq(cfg).to(device)

    def forward(self, meta: AttentionMetadata,
                kv_caches: list[tuple[KVCache, KVCache]]) -> torch.Tensor:
        """Final hidden states [T, hidden]; writes this step's K/V into ``kv_caches``."""
        eps = self.config.rms_norm_eps
        x = self.embed_tokens[meta.input_ids]  # [T, hidden]
        cos, sin = rotary_cos_sin(meta.positions, self.inv_freq, self.dtype)  # [T, D]
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            h = rms_norm(x, layer.input_norm, eps)
            x = x + self.attention(layer, h, cos, sin, meta, k_cache, v_cache)
            h = rms_norm(x, layer.post_attention_norm, eps)
            x = x + layer.down_proj(F.silu(layer.gate_proj(h)) * layer.up_proj(h))
        return rms_norm(x, self.norm, eps)

    def attention(self, layer: DecoderLayer, h: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, meta: AttentionMetadata, k_cache: KVCache,
                  v_cache: KVCache) -> torch.Tensor:
        cfg = self.config
        T, D = h.shape[0], cfg.head_dim
        q = layer.q_proj(h).view(T, cfg.num_heads, D)
        k = layer.k_proj(h).view(T, cfg.num_kv_heads, D)
        v = layer.v_proj(h).view(T, cfg.num_kv_heads, D)
        if cfg.qk_norm:
            q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, meta, scale=D ** -0.5,
                            sliding_window=cfg.sliding_window)
        return layer.o_proj(o.reshape(T, cfg.num_heads * D))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab]."""
        return F.linear(hidden, self.lm_head).float()
