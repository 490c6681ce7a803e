"""AWQ (Lin et al., 2023): protect the weights that meet large activations.

1. Scale search: for each group of linears sharing an input, try s = mean|x|^alpha over a
   grid of alpha in [0, 1) and keep the one whose fake-quantized ``(W * s)`` gives outputs
   closest to the full-precision ones on calibration tokens. s is then folded into the
   producer of x (see ``quantize.smoothing``).
2. Clipping search: per output channel and group, shrink the weight range by up to half
   (AutoAWQ's grid) where that lowers the group's contribution error on calibration tokens.
   As in AutoAWQ, q_proj and k_proj keep their full range (their errors pass through softmax).
"""

from __future__ import annotations

import torch

from twinfer.quant import QuantScheme, fake_quantize


def search_scale(x: torch.Tensor, x_mean_abs: torch.Tensor, weights: list[torch.Tensor],
                 scheme: QuantScheme, layer: str, grid: int = 20) -> torch.Tensor:
    """The best per-input-channel scale s [K] for linears ``weights`` ([N_i, K]) reading
    inputs x [n, K] whose mean magnitude per channel is ``x_mean_abs`` [K]."""
    W = torch.cat(weights)
    reference = x @ W.t()
    best_loss, best_s = float("inf"), torch.ones_like(x_mean_abs)
    for step in range(grid):
        s = x_mean_abs.clamp(min=1e-4).pow(step / grid)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1
        Wq = fake_quantize(W * s, scheme) / s
        loss = (x @ Wq.t() - reference).pow(2).mean().item()
        if loss < best_loss:
            best_loss, best_s = loss, s
    return best_s


def search_clip(x: torch.Tensor, weight: torch.Tensor, scheme: QuantScheme, layer: str,
                grid: int = 20, max_shrink: float = 0.5, rows_per_chunk: int = 1024
                ) -> torch.Tensor:
    """Per (output channel, group) clipping bound max|w| [N, G, 1] minimising the group's
    dot-product error on calibration rows x [n, K]."""
    N, K = weight.shape
    gs = scheme.group_size_for(K, layer)
    G = K // gs
    xg = x.view(-1, G, gs)  # [n, G, gs]
    best = []
    for r0 in range(0, N, rows_per_chunk):
        w = weight[r0:r0 + rows_per_chunk].view(-1, G, gs)  # [n_rows, G, gs]
        reference = torch.einsum("tgk,ngk->tng", xg, w)
        org_max = w.abs().amax(-1, keepdim=True)  # [n_rows, G, 1]
        best_max, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
        for step in range(int(max_shrink * grid)):
            max_val = org_max * (1 - step / grid)
            wq = fake_quantize(torch.clamp(w, -max_val, max_val).view(-1, K), scheme)
            err = (torch.einsum("tgk,ngk->tng", xg, wq.view(-1, G, gs)) - reference)
            err = err.pow(2).mean(0).unsqueeze(-1)  # [n_rows, G, 1]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, max_val, best_max)
        best.append(best_max)
    return torch.cat(best)


def apply_clip(weight: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """weight [N, K] clamped per (channel, group) to [-max_val, max_val] ([N, G, 1])."""
    N, K = weight.shape
    G = max_val.shape[1]
    return torch.clamp(weight.view(N, G, K // G), -max_val, max_val).view(N, K)
