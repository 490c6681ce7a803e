"""The Llama-family forward pass on Triton kernels: fused QKV and gate/up projections,
RMSNorm fused with the residual add, in-place rotary, paged attention kernels.

Same math as engine_torch/model.py; the differences are only in how it is computed. Decode
steps rotate and cache the new K/V inside the attention kernel; a one-row decode step (batch-1
decode, the latency case) runs through the GEMV kernels, chained by programmatic dependent
launch: with dense weights they also absorb the norms, SiLU-and-mul and the residual adds (five
kernels per layer instead of ten); with weight-only quantized weights only the residual adds
(the quantized GEMVs measured slower with the rest fused in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine_fast.linear import FastLinear, build_fast_linear
from engine_torch.layers import rope_inv_freq
from twinfer.batch import AttentionMetadata
from twinfer.kv_cache_memory import KVCache
from twinfer.weights import ModelWeights
from twinfer_kernels.decode_attention import NewKV, decode_attention
from twinfer_kernels.elementwise import rms_norm, rms_norm_int8, silu_and_mul, silu_and_mul_int8
from twinfer_kernels.int8_activations import QuantizedActivation
from twinfer_kernels.prefill_attention import BLOCK_M, make_tiles, prefill_attention
from twinfer_kernels.rotary_kv import rotary_and_write_kv


@dataclass
class FastLayer:
    input_norm: torch.Tensor
    qkv_proj: FastLinear  # [(H + 2 Hkv) D, hidden]: q, k, v rows stacked, one GEMM
    o_proj: FastLinear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    post_attention_norm: torch.Tensor
    gate_up_proj: FastLinear  # [2 I, hidden]: gate rows then up rows, one GEMM
    down_proj: FastLinear
    # Act-order checkpoints: the norms and the attention write their outputs in the group
    # order of the linear after them (see fold_act_order_gathers).
    input_norm_perm: torch.Tensor | None = None
    post_attention_norm_perm: torch.Tensor | None = None
    attention_out_cols: torch.Tensor | None = None


def fold_act_order_gathers(layer: FastLayer, intermediate_size: int) -> None:
    """Act-order linears read their input columns in group order, x[:, perm]: a gather kernel
    before each call. All four are folded away: the norm before qkv and the one before gate/up
    write their outputs permuted, the attention kernels store each (head, d) at the column
    o_proj reads it from (the inverse permutation), and gate/up's output rows are permuted so
    that silu(gate) * up comes out in down's order."""
    layer.input_norm_perm, layer.qkv_proj.input_perm = layer.qkv_proj.input_perm, None
    if layer.o_proj.input_perm is not None:
        layer.attention_out_cols = torch.argsort(layer.o_proj.input_perm).to(torch.int32)
        layer.o_proj.input_perm = None
    layer.post_attention_norm_perm = layer.gate_up_proj.input_perm
    layer.gate_up_proj.input_perm = None
    perm = layer.down_proj.input_perm
    if perm is not None:
        layer.gate_up_proj.permute_outputs(torch.cat([perm, perm + intermediate_size]))
        layer.down_proj.input_perm = None


class FastLlama:
    """Weights repacked for the kernels, and the forward pass over the paged KV cache."""

    def __init__(self, weights: ModelWeights, device: torch.device, dtype: torch.dtype):
        cfg = self.config = weights.config

        def t(name: str) -> torch.Tensor:
            return weights.get(name).to(device=device, dtype=dtype, copy=True).contiguous()

        def linear(*prefixes: str, bias: bool = False) -> FastLinear:
            return build_fast_linear(weights, list(prefixes), device, dtype, bias)

        self.embed_tokens = t("model.embed_tokens.weight")
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            self.layers.append(FastLayer(
                input_norm=t(p + "input_layernorm.weight"),
                qkv_proj=linear(a + "q_proj", a + "k_proj", a + "v_proj", bias=cfg.qkv_bias),
                o_proj=linear(a + "o_proj"),
                q_norm=t(a + "q_norm.weight") if cfg.qk_norm else None,
                k_norm=t(a + "k_norm.weight") if cfg.qk_norm else None,
                post_attention_norm=t(p + "post_attention_layernorm.weight"),
                gate_up_proj=linear(p + "mlp.gate_proj", p + "mlp.up_proj"),
                down_proj=linear(p + "mlp.down_proj"),
            ))
            fold_act_order_gathers(self.layers[-1], cfg.intermediate_size)
        self.norm = t("model.norm.weight")
        self.lm_head = self.embed_tokens if cfg.tie_word_embeddings else t("lm_head.weight")
        self.inv_freq = rope_inv_freq(cfg).to(device)
        # The one-row step through the GEMV kernels: dense or weight-only weights (W8A8 has no
        # one-row GEMV). On CUDA by default; tests turn it on under the interpreter.
        linears = [lin for layer in self.layers for lin in
                   (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)]
        self.fuse_one_row = device.type == "cuda" and all(
            lin.quantized is None or lin.quantized.act_bits == 16 for lin in linears)
        # The norms and SiLU-and-mul inside the GEMVs too, or as separate (PDL-chained)
        # kernels: inside pays for dense weights; the quantized GEMVs measured slower with
        # them (H200: w4a16 step 3.31 ms fused against 2.79 unfused; bench/RESULTS.md).
        self.fuse_gemv_inputs = all(lin.quantized is None for lin in linears)
        # Programmatic dependent launches between the fused step's kernels (Hopper on).
        self.pdl = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
        # W8A8 linears get their input as int8 from the norm / SiLU-and-mul kernel before them
        # rather than from a quantize kernel of their own (off: for A/B measurements).
        self.int8_from_norms = True

    def forward(self, meta: AttentionMetadata, kv_caches: list[tuple[KVCache, KVCache]],
                decode_only: bool, num_splits: int = 1) -> torch.Tensor:
        """Final hidden states [T, hidden]. ``decode_only``: every sequence has one query, so
        the decode kernel runs (and nothing reads host-side lengths: CUDA-graph safe)."""
        cfg = self.config
        H, Hkv, D, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        T = meta.input_ids.shape[0]
        if decode_only and T == 1 and self.fuse_one_row:
            return self._forward_one_row(meta, kv_caches, num_splits)
        x = self.embed_tokens[meta.input_ids]
        residual = None
        tiles = None if decode_only else make_tiles(meta.query_lens_cpu, BLOCK_M, x.device)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            h, residual = self._norm_for(layer.qkv_proj, x, layer.input_norm, residual,
                                         layer.input_norm_perm)
            qkv = layer.qkv_proj(h)
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            q, k, v = q.view(T, H, D), k.view(T, Hkv, D), v.view(T, Hkv, D)
            if cfg.qk_norm:
                q = rms_norm(q.reshape(T * H, D), layer.q_norm, eps)[0].view(T, H, D)
                k = rms_norm(k.reshape(T * Hkv, D), layer.k_norm, eps)[0].view(T, Hkv, D)
            if decode_only:
                o = decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                     D ** -0.5, num_splits=num_splits,
                                     new_kv=self._new_kv(k, v, meta),
                                     out_cols=layer.attention_out_cols)
            else:
                rotary_and_write_kv(q, k, v, meta.positions, self.inv_freq, k_cache, v_cache,
                                    meta.slot_mapping)
                o = prefill_attention(q, k_cache, v_cache, meta.block_tables,
                                      meta.query_start_loc, meta.context_lens,
                                      meta.query_lens_cpu, D ** -0.5, cfg.sliding_window,
                                      out_cols=layer.attention_out_cols, tiles=tiles)
            x = layer.o_proj(o.view(T, H * D))
            h, residual = self._norm_for(layer.gate_up_proj, x, layer.post_attention_norm,
                                         residual, layer.post_attention_norm_perm)
            x = layer.down_proj(self._silu_for(layer.down_proj, layer.gate_up_proj(h)))
        return rms_norm(x, self.norm, eps, residual)[0]

    def _norm_for(self, linear: FastLinear, x: torch.Tensor, weight: torch.Tensor,
                  residual: torch.Tensor | None, perm: torch.Tensor | None
                  ) -> tuple[torch.Tensor | QuantizedActivation, torch.Tensor]:
        """rms_norm(x, weight, eps, residual, perm) as ``linear`` wants its input: per-token
        int8 for a W8A8 weight (which has no act-order perm)."""
        eps = self.config.rms_norm_eps
        if linear.takes_int8 and self.int8_from_norms and perm is None:
            return rms_norm_int8(x, weight, eps, residual)
        return rms_norm(x, weight, eps, residual, perm)

    def _silu_for(self, linear: FastLinear,
                  gate_up: torch.Tensor) -> torch.Tensor | QuantizedActivation:
        """silu_and_mul(gate_up) as ``linear`` wants its input (per-token int8 for W8A8)."""
        if linear.takes_int8 and self.int8_from_norms:
            return silu_and_mul_int8(gate_up)
        return silu_and_mul(gate_up)

    def _forward_one_row(self, meta: AttentionMetadata,
                         kv_caches: list[tuple[KVCache, KVCache]],
                         num_splits: int) -> torch.Tensor:
        """forward() for one decode row: h is the residual stream; the o and down GEMVs add
        the residual to their output; with ``fuse_gemv_inputs`` the qkv and gate/up GEMVs
        normalize (and, act-order, gather) their input and down applies SiLU-and-mul to it,
        otherwise separate kernels do. Every kernel is a programmatic dependent launch (``pdl``)."""
        cfg = self.config
        H, Hkv, D, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        pdl = self.pdl
        h = self.embed_tokens[meta.input_ids]
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            qkv = self._norm_gemv(layer.qkv_proj, h, layer.input_norm, layer.input_norm_perm)
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            q, k, v = q.view(1, H, D), k.view(1, Hkv, D), v.view(1, Hkv, D)
            if cfg.qk_norm:
                q = rms_norm(q.reshape(H, D), layer.q_norm, eps)[0].view(1, H, D)
                k = rms_norm(k.reshape(Hkv, D), layer.k_norm, eps)[0].view(1, Hkv, D)
            o = decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                 D ** -0.5, num_splits=num_splits,
                                 new_kv=self._new_kv(k, v, meta),
                                 out_cols=layer.attention_out_cols, pdl=pdl)
            h = layer.o_proj.gemv(o.view(1, H * D), residual=h, pdl=pdl)
            gate_up = self._norm_gemv(layer.gate_up_proj, h, layer.post_attention_norm,
                                      layer.post_attention_norm_perm)
            if self.fuse_gemv_inputs:
                h = layer.down_proj.gemv(gate_up, silu=True, residual=h, pdl=pdl)
            else:
                h = layer.down_proj.gemv(silu_and_mul(gate_up, pdl=pdl), residual=h, pdl=pdl)
        return rms_norm(h, self.norm, eps)[0]

    def _norm_gemv(self, linear: FastLinear, h: torch.Tensor, norm_weight: torch.Tensor,
                   perm: torch.Tensor | None) -> torch.Tensor:
        """linear(RMSNorm(h) * norm_weight), columns in ``perm`` order (act-order)."""
        eps, pdl = self.config.rms_norm_eps, self.pdl
        if self.fuse_gemv_inputs:
            return linear.gemv(h, norm_weight=norm_weight, eps=eps, input_perm=perm, pdl=pdl)
        return linear.gemv(rms_norm(h, norm_weight, eps, out_perm=perm, pdl=pdl)[0], pdl=pdl)

    def _new_kv(self, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> NewKV:
        return NewKV(k, v, meta.positions, self.inv_freq, meta.slot_mapping)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()

