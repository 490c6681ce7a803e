"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian of the layer's
inputs, H = 2 X^T X / n. Blocked updates (128 columns at a time) keep it matmul-bound.

Groups are formed in the order columns are quantized; with ``act_order`` that order is by
decreasing diag(H) (the most active inputs first) and ``g_idx`` records each input channel's
group, as GPTQ checkpoints with ``desc_act`` do.
"""

from __future__ import annotations

import torch

from twinfer.quant import QuantizedWeight, QuantScheme, compute_qparams, quantize_codes


class HessianAccumulator:
    """Running H = 2 X^T X / n over batches of a linear's inputs [..., K]."""

    def __init__(self, in_features: int, device: torch.device | str):
        self.H = torch.zeros(in_features, in_features, device=device, dtype=torch.float32)
        self.num_rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.H *= self.num_rows / (self.num_rows + n)
        self.num_rows += n
        x = x * (2 / self.num_rows) ** 0.5
        self.H += x.t() @ x


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, layer: str,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128
                  ) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` [N, K] given its input Hessian ``H`` [K, K]."""
    W = weight.detach().clone().float()
    N, K = W.shape
    gs = scheme.group_size_for(K, layer)
    H = H.clone().float()
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    H[range(K), range(K)] += damp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros_like(W)
    scales = torch.zeros(N, K // gs, device=W.device)
    zeros = torch.zeros_like(scales)
    if gs == K:  # per channel: one range for the whole row, fixed before any update
        scale, zero = compute_qparams(W.amin(1, keepdim=True), W.amax(1, keepdim=True),
                                      scheme.bits, scheme.sym)
    for b0 in range(0, K, block_size):
        b1 = min(b0 + block_size, K)
        W1, Hinv1 = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1]
        err1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            col = b0 + i
            if gs != K and col % gs == 0:
                # The group's range from its current (already error-updated) values.
                g = (W1[:, i:i + gs] if i + gs <= b1 - b0
                     else torch.cat([W1[:, i:], W[:, b1:col + gs]], 1))
                scale, zero = compute_qparams(g.amin(1, keepdim=True), g.amax(1, keepdim=True),
                                              scheme.bits, scheme.sym)
                scales[:, col // gs], zeros[:, col // gs] = scale[:, 0], zero[:, 0]
            w = W1[:, i:i + 1]
            q = quantize_codes(w, scale, zero, scheme.bits)
            codes[:, col:col + 1] = q
            err = (w - (q - zero) * scale) / Hinv1[i, i]
            W1[:, i:] -= err @ Hinv1[i:i + 1, i:]
            err1[:, i:i + 1] = err
        W[:, b1:] -= err1 @ Hinv[b0:b1, b1:]
    if gs == K:
        scales, zeros = scale, zero

    g_idx = None
    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        g_idx = (inverse // gs).to(torch.int32)  # channel c was quantized at position inverse[c]
    return QuantizedWeight(codes=codes.to(torch.uint8).contiguous(), scales=scales.contiguous(),
                           zeros=zeros.to(torch.uint8).contiguous(), bits=scheme.bits,
                           group_size=gs, act_bits=scheme.act_bits, g_idx=g_idx)
