"""One decoder layer as dense tensors, run over calibration windows without a KV cache.

Calibration sees whole windows [B, T] at once, so attention is plain causal SDPA; the
arithmetic is engine_torch's (same rms_norm and rotary). Each linear's input passes through
an ``observe(name, x)`` callback first: that is where the methods collect statistics, so no
hooks are ever attached to anything.

With ``observe_mixed_v`` the layer also reports, as ``MIXED_V``, v_proj's inputs as each query
head's attention mixes them: [Hkv, B * H / Hkv * T, hidden], KV head first. v's error reaches
the attention output only through that mixture, so it, not the raw input, is what v's
quantization error should be measured on (see ``quantize.pipeline``).

Linear names are the Hugging Face suffixes: ``self_attn.q_proj`` ... ``mlp.down_proj``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine_torch.layers import apply_rotary, rms_norm
from twinfer.config import ModelConfig
from twinfer.quant import quantize_activations_per_token

ATTN_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_IN = ("mlp.gate_proj", "mlp.up_proj")
LINEARS = ATTN_IN + ("self_attn.o_proj",) + MLP_IN + ("mlp.down_proj",)
MIXED_V = "self_attn.v_proj:mixed"

Observer = Callable[[str, torch.Tensor], None]


def layer_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig, i: int,
                  device: torch.device | str) -> dict[str, torch.Tensor]:
    """Layer ``i``'s tensors in float32 on ``device``, keyed by name inside the layer."""
    prefix = f"model.layers.{i}."
    return {k[len(prefix):]: v.to(device=device, dtype=torch.float32, copy=True)
            for k, v in tensors.items() if k.startswith(prefix)}


def _linear(t: dict[str, torch.Tensor], name: str, x: torch.Tensor, observe: Observer | None,
            act_int8: bool) -> torch.Tensor:
    if observe is not None:
        observe(name, x)
    if act_int8:  # W8A8 simulation: the next layer sees what the int8 kernel computes
        x_q, scale = quantize_activations_per_token(x.reshape(-1, x.shape[-1]))
        x = (x_q.float() * scale).reshape(x.shape)
    return F.linear(x, t[name + ".weight"], t.get(name + ".bias"))


def layer_forward(cfg: ModelConfig, t: dict[str, torch.Tensor], x: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, observe: Observer | None = None,
                  act_int8: bool = False, observe_mixed_v: bool = False) -> torch.Tensor:
    """x [B, T, hidden] -> the layer's output [B, T, hidden] (residuals included).

    cos, sin: [T, head_dim] for positions 0..T-1. ``observe_mixed_v``: see the module docstring.
    """
    h = rms_norm(x, t["input_layernorm.weight"], cfg.rms_norm_eps)
    x = x + attention(cfg, t, h, cos, sin, observe, act_int8, observe_mixed_v)
    h = rms_norm(x, t["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    return x + mlp(t, h, observe, act_int8)


def attention(cfg: ModelConfig, t: dict[str, torch.Tensor], h: torch.Tensor,
              cos: torch.Tensor, sin: torch.Tensor, observe: Observer | None = None,
              act_int8: bool = False, observe_mixed_v: bool = False) -> torch.Tensor:
    """The self-attention block: normed input h [B, T, hidden] -> o_proj's output."""
    B, T, _ = h.shape
    H, Hkv, D, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps

    def lin(name: str, a: torch.Tensor) -> torch.Tensor:
        return _linear(t, name, a, observe, act_int8)

    q = lin("self_attn.q_proj", h).view(B * T, H, D)
    k = lin("self_attn.k_proj", h).view(B * T, Hkv, D)
    v = lin("self_attn.v_proj", h).view(B, T, Hkv, D)
    if cfg.qk_norm:
        q = rms_norm(q, t["self_attn.q_norm.weight"], eps)
        k = rms_norm(k, t["self_attn.k_norm.weight"], eps)
    cos_bt, sin_bt = cos.repeat(B, 1), sin.repeat(B, 1)
    q = apply_rotary(q, cos_bt, sin_bt).view(B, T, H, D).transpose(1, 2)
    k = apply_rotary(k, cos_bt, sin_bt).view(B, T, Hkv, D).transpose(1, 2)
    v = v.transpose(1, 2)
    if Hkv != H:
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    if observe is not None and observe_mixed_v:
        observe(MIXED_V, _mixed_inputs(q, k, h, Hkv))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=D ** -0.5)
    return lin("self_attn.o_proj", o.transpose(1, 2).reshape(B, T, H * D))


def mlp(t: dict[str, torch.Tensor], h: torch.Tensor, observe: Observer | None = None,
        act_int8: bool = False) -> torch.Tensor:
    """The MLP block: normed input h [B, T, hidden] -> down_proj's output."""
    def lin(name: str, a: torch.Tensor) -> torch.Tensor:
        return _linear(t, name, a, observe, act_int8)

    return lin("mlp.down_proj", F.silu(lin("mlp.gate_proj", h)) * lin("mlp.up_proj", h))


def _mixed_inputs(q: torch.Tensor, k: torch.Tensor, h: torch.Tensor, num_kv_heads: int
                  ) -> torch.Tensor:
    """Each query head's attention applied to the layer's normed input h [B, T, hidden]:
    [Hkv, B * H / Hkv * T, hidden], grouped by the KV head whose v rows the head reads.
    q, k: [B, H, T, D] after rotary (k already repeated per query head)."""
    B, H, T, D = q.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    probs = (q @ k.transpose(-1, -2) * D ** -0.5).masked_fill(causal, float("-inf")).softmax(-1)
    mixed = probs @ h.unsqueeze(1)  # [B, H, T, hidden]
    return mixed.view(B, num_kv_heads, H // num_kv_heads, T, -1).transpose(0, 1).reshape(
        num_kv_heads, -1, h.shape[-1])
