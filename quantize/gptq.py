"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian of the layer's
inputs, H = 2 X^T X / n. Blocked updates (128 columns at a time) keep it matmul-bound.

Groups are formed in the order columns are quantized; with ``act_order`` that order is by
decreasing diag(H) (the most active inputs first) and ``g_idx`` records each input channel's
group, as GPTQ checkpoints with ``desc_act`` do.

A weight's output rows may come in R blocks that each see different inputs (v_proj's rows per
KV head: each is read through its own heads' attention), so H may be [R, K, K], one Hessian
per block of N / R consecutive rows; the algorithm is the same, batched over blocks.

With ``mse`` each group's range is searched rather than taken from its min / max
(``mse_qparams``, the reference GPTQ Quantizer's ``mse=True``): one large weight no longer
stretches the grid for the other 63 of its group.
"""

from __future__ import annotations

import torch

from twinfer.quant import QuantizedWeight, QuantScheme, compute_qparams, quantize_codes


class HessianAccumulator:
    """Running H = 2 X^T X / n over batches of a linear's inputs: [K, K] from inputs [..., K],
    or with ``num_blocks`` R, [R, K, K] from inputs [R, ..., K] (one Hessian per row block)."""

    def __init__(self, in_features: int, device: torch.device | str,
                 num_blocks: int | None = None):
        shape = (in_features, in_features) if num_blocks is None else (
            num_blocks, in_features, in_features)
        self.H = torch.zeros(shape, device=device, dtype=torch.float32)
        self.num_rows = 0

    def add(self, x: torch.Tensor) -> None:
        batched = self.H.dim() == 3
        x = x.reshape(x.shape[0] if batched else 1, -1, x.shape[-1]).float()  # [R, n, K]
        n = x.shape[1]
        self.H *= self.num_rows / (self.num_rows + n)
        self.num_rows += n
        x = x * (2 / self.num_rows) ** 0.5
        self.H += (x.transpose(1, 2) @ x).view_as(self.H)


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, layer: str,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  order_by: torch.Tensor | None = None, mse: bool = False) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` [N, K] given its input Hessian ``H``: [K, K] shared by every
    row, or [R, K, K], one per block of N / R consecutive rows (see the module docstring).

    ``order_by`` [K]: what act-order sorts by (default diag(H)); linears fused at load time
    (q/k/v, gate/up) must pass the same one so that their g_idx agree; ``mse``: search each
    group's range (``mse_qparams``) instead of using its min / max."""
    N, K = weight.shape
    H = H.clone().float().reshape(-1, K, K)  # [R, K, K]
    R = H.shape[0]
    if N % R:
        raise ValueError(f"{layer}: {N} rows do not split into {R} Hessian blocks")
    W = weight.detach().clone().float().reshape(R, N // R, K)
    gs = scheme.group_size_for(K, layer)
    diag = H.diagonal(dim1=-2, dim2=-1)  # a view: writes go into H
    dead = diag == 0  # inputs that were always zero: their weights cannot matter
    diag[dead] = 1
    W.masked_fill_(dead[:, None, :], 0)
    # One order for every block: a checkpoint has a single g_idx per linear.
    order = diag.sum(0) if order_by is None else order_by
    perm = torch.argsort(order, descending=True) if act_order else None
    if perm is not None:
        W, H = W[..., perm], H[:, perm][:, :, perm]
        diag = H.diagonal(dim1=-2, dim2=-1)
    diag += damp * diag.mean(-1, keepdim=True)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes, scales, zeros = _quantize_columns(W, Hinv, scheme, gs, block_size, mse)
    codes, scales, zeros = codes.reshape(N, K), scales.reshape(N, -1), zeros.reshape(N, -1)

    g_idx = None
    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        g_idx = (inverse // gs).to(torch.int32)  # channel c was quantized at position inverse[c]
    return QuantizedWeight(codes=codes.to(torch.uint8).contiguous(), scales=scales.contiguous(),
                           zeros=zeros.to(torch.uint8).contiguous(), bits=scheme.bits,
                           group_size=gs, act_bits=scheme.act_bits, g_idx=g_idx)


def mse_qparams(w: torch.Tensor, bits: int, sym: bool, grid: int = 100, max_shrink: float = 0.8,
                norm: float = 2.4, chunk: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros [..., 1] for groups w [..., gs]: of the ranges p * [min, max] for p
    from 1 down to 1 - max_shrink in steps of 1 / grid, the one with the lowest
    sum |w - dequant(quant(w))|^norm per group (the reference GPTQ Quantizer's ``mse=True``
    and its defaults). p = 1 is plain min / max, so the error is never above its error.
    Groups go through in slices of about ``chunk`` candidate elements (bounded memory)."""
    p = 1 - torch.arange(int(max_shrink * grid), device=w.device) / grid  # [P], p[0] = 1
    rows = w.reshape(-1, w.shape[-1])
    step = max(1, chunk // (len(p) * w.shape[-1]))
    parts = [_best_range(rows[i:i + step], p, bits, sym, norm)
             for i in range(0, rows.shape[0], step)]
    scale, zero = (torch.cat(t).view(*w.shape[:-1], 1) for t in zip(*parts))
    return scale, zero


def _best_range(w: torch.Tensor, p: torch.Tensor, bits: int, sym: bool, norm: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``mse_qparams`` for groups w [G, gs] and shrink factors p [P]: scale, zero [G, 1]."""
    w_min, w_max = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    p = p.view(-1, 1, 1)
    scale, zero = compute_qparams(p * w_min, p * w_max, bits, sym)  # [P, G, 1]
    dq = (quantize_codes(w, scale, zero, bits) - zero) * scale  # [P, G, gs]
    err = (dq - w).abs_().pow_(norm).sum(-1, keepdim=True)  # [P, G, 1]
    best = err.argmin(0, keepdim=True)  # the first minimum: ties keep the wider range
    return scale.gather(0, best)[0], zero.gather(0, best)[0]


def _quantize_columns(W: torch.Tensor, Hinv: torch.Tensor, scheme: QuantScheme, gs: int,
                      block_size: int, mse: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPTQ column loop over W [R, M, K] (updated in place) with upper Cholesky factors
    of the inverse Hessians Hinv [R, K, K]: codes [R, M, K], scales and zeros [R, M, G]."""
    def qparams(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # g [R, M, gs]
        if mse:
            return mse_qparams(g, scheme.bits, scheme.sym)
        return compute_qparams(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True),
                               scheme.bits, scheme.sym)

    R, M, K = W.shape
    codes = torch.zeros_like(W)
    scales = torch.zeros(R, M, K // gs, device=W.device)
    zeros = torch.zeros_like(scales)
    if gs == K:  # per channel: one range for the whole row, fixed before any update
        scale, zero = qparams(W)
    for b0 in range(0, K, block_size):
        b1 = min(b0 + block_size, K)
        W1, Hinv1 = W[..., b0:b1].clone(), Hinv[:, b0:b1, b0:b1]
        err1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            col = b0 + i
            if gs != K and col % gs == 0:
                # The group's range from its current (already error-updated) values.
                g = (W1[..., i:i + gs] if i + gs <= b1 - b0
                     else torch.cat([W1[..., i:], W[..., b1:col + gs]], -1))
                scale, zero = qparams(g)
                scales[..., col // gs], zeros[..., col // gs] = scale[..., 0], zero[..., 0]
            w = W1[..., i:i + 1]  # [R, M, 1]
            q = quantize_codes(w, scale, zero, scheme.bits)
            codes[..., col:col + 1] = q
            err = (w - (q - zero) * scale) / Hinv1[:, i:i + 1, i:i + 1]
            W1[..., i:] -= err * Hinv1[:, i:i + 1, i:]  # outer product [R, M, B - i]
            err1[..., i:i + 1] = err
        W[..., b1:] -= err1 @ Hinv[:, b0:b1, b1:]
    if gs == K:
        scales, zeros = scale, zero
    return codes, scales, zeros
