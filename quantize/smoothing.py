"""Per-input-channel scales that move quantization difficulty between activations and
weights without changing the model's function (AWQ and SmoothQuant both use this).

For a group of linears sharing an input x, ``y = x W^T = (x / s)(W * s)^T``; the division by
``s`` is folded into whatever produced x: an RMSNorm's weight, or the rows of the previous
linear (``up_proj`` before ``down_proj``, ``v_proj`` before ``o_proj`` when every query head has
its own KV head; with ``shared_v``, also under grouped-query attention, where the query heads
that read one v row must share that row's scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantize.decoder_layer import ATTN_IN, MLP_IN
from twinfer.config import ModelConfig


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read one input, and the op that writes that input."""

    prev: str  # "input_layernorm" (an RMSNorm) or "mlp.up_proj" (a linear)
    linears: tuple[str, ...]
    heads_per_kv: int = 1  # v_proj -> o_proj under GQA: query heads reading one v row
    head_dim: int = 1

    def foldable(self, s: torch.Tensor) -> torch.Tensor:
        """s [K] made foldable into the producer: under GQA the query heads that read one v
        row share one scale for that row's o_proj columns (their geometric mean)."""
        if self.heads_per_kv == 1:
            return s
        per_head = s.view(-1, self.heads_per_kv, self.head_dim)  # [Hkv, H / Hkv, D]
        return per_head.log().mean(1, keepdim=True).exp().expand_as(per_head).reshape(-1)

    @property
    def prev_is_norm(self) -> bool:
        return self.prev.endswith("layernorm")


def scale_groups(cfg: ModelConfig, shared_v: bool = False) -> list[ScaleGroup]:
    """The foldable groups of a Llama-family layer. Under GQA one v row feeds several o_proj
    columns: o_proj is a group only with ``shared_v`` (scales tied per v row, ``foldable``)."""
    groups = [ScaleGroup("input_layernorm", ATTN_IN)]
    if cfg.num_heads == cfg.num_kv_heads or shared_v:
        groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",),
                                 cfg.num_heads // cfg.num_kv_heads, cfg.head_dim))
    groups += [ScaleGroup("post_attention_layernorm", MLP_IN),
               ScaleGroup("mlp.up_proj", ("mlp.down_proj",))]
    return groups


def fold_scales(t: dict[str, torch.Tensor], group: ScaleGroup, s: torch.Tensor) -> None:
    """In place: the group's linears' input columns times s, the producer's output over s
    (s must be ``group.foldable``)."""
    for name in group.linears:
        t[name + ".weight"] = t[name + ".weight"] * s
    # the producer's outputs: under GQA one per group of heads_per_kv heads' columns
    s = s.view(-1, group.heads_per_kv, group.head_dim)[:, 0].reshape(-1)
    if group.prev_is_norm:
        t[group.prev + ".weight"] = t[group.prev + ".weight"] / s
    else:
        t[group.prev + ".weight"] = t[group.prev + ".weight"] / s[:, None]
        if group.prev + ".bias" in t:
            t[group.prev + ".bias"] = t[group.prev + ".bias"] / s


def smoothquant_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor],
                       alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha) over the group's weights."""
    w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    s = act_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)
