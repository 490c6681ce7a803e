"""Per-input-channel scales that move quantization difficulty between activations and
weights without changing the model's function (AWQ and SmoothQuant both use this).

For a group of linears sharing an input x, ``y = x W^T = (x / s)(W * s)^T``; the division by
``s`` is folded into whatever produced x: an RMSNorm's weight, or the rows of the previous
linear (``up_proj`` before ``down_proj``, ``v_proj`` before ``o_proj`` when every query head has
its own KV head).
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

    @property
    def prev_is_norm(self) -> bool:
        return self.prev.endswith("layernorm")


def scale_groups(cfg: ModelConfig) -> list[ScaleGroup]:
    """The foldable groups of a Llama-family layer."""
    groups = [ScaleGroup("input_layernorm", ATTN_IN)]
    if cfg.num_heads == cfg.num_kv_heads:  # with GQA one v row feeds several o columns
        groups.append(ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",)))
    groups += [ScaleGroup("post_attention_layernorm", MLP_IN),
               ScaleGroup("mlp.up_proj", ("mlp.down_proj",))]
    return groups


def fold_scales(t: dict[str, torch.Tensor], group: ScaleGroup, s: torch.Tensor) -> None:
    """In place: the group's linears' input columns times s, the producer's output over s."""
    for name in group.linears:
        t[name + ".weight"] = t[name + ".weight"] * s
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
