"""AWQ (Lin et al., 2023): protect the weights that meet large activations.

1. Scale search: for each group of linears sharing an input, try s = mean|x|^alpha over a
   grid of alpha in [0, 1) (optionally also AutoAWQ's "duo" mean|x|^a / mean|w|^(1-a)) and
   keep the one whose fake-quantized ``(W * s)`` gives outputs closest to the full-precision ones on
   calibration tokens: each linear's own output, or (``search_scale_by`` with
   ``block_output_error``) the output of the whole attention / MLP block, AutoAWQ's loss.
   Optionally (``search_scale``'s ``clip``) each candidate is judged after a clip search
   instead of plain rounding. s is then folded into the producer of x (``quantize.smoothing``).
2. Clipping search: per output channel and group, shrink the weight range by up to half
   (AutoAWQ's grid, plus both ends of the range together for asymmetric schemes, optionally
   each end by its own factor) where that lowers the group's contribution error on
   calibration tokens; optional coordinate-descent sweeps then re-choose each group's range
   for its channel's whole output error, cross terms between groups included.
   AutoAWQ leaves q_proj and k_proj unclipped (their errors pass through the softmax);
   ``quantize.pipeline`` clips them too by default (measured better with the sweeps).

Both errors are quadratic forms in the weight error: for inputs x with second moment
C = E[x^T x], E||x (W - W_q)^T||^2 = sum_n (W - W_q)_n C (W - W_q)_n^T. Computing them from C
(the same matrix GPTQ calls H / 2) costs N K^2 per candidate instead of tokens x N x K, and
uses every calibration token rather than a sample. C may also be [R, K, K], one moment per
block of N / R consecutive output rows (v_proj's rows per KV head, measured on the inputs as
the attention mixes them: see ``quantize.pipeline``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from twinfer.quant import QuantScheme, compute_qparams, fake_quantize, quantize_codes


def output_error(delta: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Mean squared output error per output channel for weight error delta [N, K] under
    input second moment C: [K, K], or [R, K, K] per block of N / R rows."""
    C = C.reshape(-1, *C.shape[-2:])
    d = delta.reshape(C.shape[0], -1, delta.shape[1])
    return ((d @ C) * d).sum(-1).reshape(delta.shape[0])


def search_scale(C: torch.Tensor | list[torch.Tensor], x_mean_abs: torch.Tensor,
                 weights: list[torch.Tensor], scheme: QuantScheme, grid: int = 20,
                 duo: bool = False, foldable: Callable | None = None,
                 clip: dict | None = None) -> torch.Tensor:
    """The best per-input-channel scale s [K] for linears ``weights`` ([N_i, K]) whose inputs
    have mean magnitude ``x_mean_abs`` [K] and second moment ``C`` (one for all, or one per
    weight: see the module docstring); ``duo`` adds AutoAWQ's weight-aware candidates;
    ``foldable`` maps each candidate to one its producer can absorb (``ScaleGroup.foldable``).
    ``clip``: judge each candidate by its error after a clip search (``search_clip`` with
    these keyword arguments, on the scaled weight and moment) instead of plain rounding."""
    moments = C if isinstance(C, list) else [C] * len(weights)

    def loss(quantized: list[torch.Tensor]) -> float:
        return sum(output_error(w - wq, m).sum().item()
                   for w, wq, m in zip(weights, quantized, moments))

    quantize = None
    if clip is not None:
        def quantize(ws: torch.Tensor, s: torch.Tensor, i: int) -> torch.Tensor:
            bounds = search_clip(moments[i] / (s[:, None] * s[None, :]), ws, scheme, "l",
                                 **clip)
            return fake_quantize(apply_clip(ws, bounds), scheme)

    return search_scale_by(loss, x_mean_abs, weights, scheme, grid, duo, foldable, quantize)


def search_scale_by(loss: Callable[[list[torch.Tensor]], float], x_mean_abs: torch.Tensor,
                    weights: list[torch.Tensor], scheme: QuantScheme, grid: int = 20,
                    duo: bool = False, foldable: Callable | None = None,
                    quantize: Callable | None = None) -> torch.Tensor:
    """``search_scale`` with any loss: ``loss(ws)`` is the error made when each of
    ``weights`` is replaced by its ``ws`` counterpart (fake_quantize(W * s) / s, or
    ``quantize(W * s, s, i)`` / s for the i-th weight). AutoAWQ's loss is the output error of
    the whole block the linears sit in (attention, MLP)."""
    if quantize is None:
        def quantize(ws: torch.Tensor, s: torch.Tensor, i: int) -> torch.Tensor:
            return fake_quantize(ws, scheme)
    best_loss, best_s = float("inf"), torch.ones_like(x_mean_abs)
    for s in _scale_candidates(x_mean_abs, weights, scheme, grid, duo):
        s = s if foldable is None else foldable(s)
        candidate = loss([quantize(w * s, s, i) / s for i, w in enumerate(weights)])
        if candidate < best_loss:
            best_loss, best_s = candidate, s
    return best_s


@torch.no_grad()
def block_output_error(block: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
                       t: dict[str, torch.Tensor], names: tuple[str, ...],
                       inputs: list[torch.Tensor]) -> Callable[[list[torch.Tensor]], float]:
    """AutoAWQ's loss for ``search_scale_by``: ``loss(ws)`` is the summed squared difference
    between ``block(t', h)`` and ``block(t, h)`` over the input batches h, where t' is the
    layer's tensors ``t`` with the weights of linears ``names`` replaced by ws (e.g. block =
    the attention, names = q/k/v; ``quantize.decoder_layer``)."""
    reference = [block(t, h) for h in inputs]

    @torch.no_grad()
    def loss(ws: list[torch.Tensor]) -> float:
        tq = {**t, **{n + ".weight": w for n, w in zip(names, ws)}}
        return sum((block(tq, h) - y).pow(2).sum().item() for h, y in zip(inputs, reference))

    return loss


def _scale_candidates(x_mean_abs: torch.Tensor, weights: list[torch.Tensor],
                      scheme: QuantScheme, grid: int, duo: bool) -> list[torch.Tensor]:
    """mean|x|^a, and with ``duo`` mean|x|^a / mean|w|^(1-a), for a on the grid, each
    centred around 1 (geometric mean of its extremes)."""
    x = x_mean_abs.clamp(min=1e-4)
    w_mean = torch.cat([_normalised_weight_magnitude(w, scheme) for w in weights]).mean(0)
    out = []
    for step in range(grid):
        a = step / grid
        out.append(x.pow(a))
        if duo:
            out.append((x.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4))
    return [s / (s.max() * s.min()).sqrt() for s in out]


def _normalised_weight_magnitude(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """|w| over its quantization group's max |w|: [N, K] (AutoAWQ's ``w_scale``)."""
    N, K = w.shape
    gs = scheme.group_size_for(K, "weight")
    g = w.abs().view(N, K // gs, gs)
    return (g / (g.amax(-1, keepdim=True) + 1e-6)).view(N, K)


def search_clip(C: torch.Tensor, weight: torch.Tensor, scheme: QuantScheme, layer: str,
                grid: int = 20, max_shrink: float = 0.5, sweeps: int = 0,
                both_ends: bool = False, max_rows: int = 1024
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (output channel, group) clipping bounds (lo, hi), each [N, G, 1], minimising each
    group's contribution to the output error (inputs' second moment ``C`` [K, K] or
    [R, K, K]). Candidates: AutoAWQ's symmetric bounds +-max|w| * p for p = 1, 1 - 1 / grid,
    ... down to 1 - max_shrink; for asymmetric schemes also [min, max] * p, which shrinks
    both ends of the group's range where the symmetric bound first shrinks the longer one,
    and with ``both_ends`` [min * p, max * p'] for every pair (p, p') on the grid.

    The group's own contribution ignores how its error combines with the other groups' in
    the same output channel (C's blocks between groups). ``sweeps`` passes of coordinate
    descent then re-choose each group's bounds for the channel's whole output error, the
    other groups' choices fixed; each choice can only lower it.

    Output channels are independent, so they are searched ``max_rows`` at a time: the sweeps
    keep every candidate's weight error, 109 candidates x rows x K floats (25 GB for a whole
    Llama-8B gate_proj, 1.8 GB per 1,024 rows)."""
    N, K = weight.shape
    gs = scheme.group_size_for(K, layer)
    C = C.reshape(-1, K, K)
    per_block = N // C.shape[0]  # consecutive rows sharing one moment
    chunks = [(r, start) for r in range(C.shape[0])
              for start in range(r * per_block, (r + 1) * per_block, max_rows)]
    bounds = [_search_clip_rows(C[r], weight[start:min(start + max_rows, (r + 1) * per_block)],
                                scheme, gs, grid, max_shrink, sweeps, both_ends)
              for r, start in chunks]
    return torch.cat([b[0] for b in bounds]), torch.cat([b[1] for b in bounds])


def _search_clip_rows(C: torch.Tensor, weight: torch.Tensor, scheme: QuantScheme, gs: int,
                      grid: int, max_shrink: float, sweeps: int, both_ends: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``search_clip`` for rows that share one moment C [K, K]."""
    N, K = weight.shape
    G = K // gs
    C_groups = torch.stack([C[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(G)])
    w = weight.view(N, G, gs)
    org_max = w.abs().amax(-1, keepdim=True)  # [N, G, 1]
    w_min, w_max = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    shrink = [1 - step / grid for step in range(int(max_shrink * grid))]
    bounds = [(-org_max * p, org_max * p) for p in shrink]
    if not scheme.sym:
        bounds += [(w_min * p_lo, w_max * p_hi) for p_lo in shrink for p_hi in shrink
                   if (p_lo, p_hi) != (1, 1) and (both_ends or p_lo == p_hi)]
    lo, hi = torch.stack([b[0] for b in bounds]), torch.stack([b[1] for b in bounds])
    best = torch.zeros(N, G, dtype=torch.long, device=w.device)  # index into bounds
    best_err = torch.full((N, G), float("inf"), device=w.device)
    deltas = []  # each candidate's weight error [N, G, gs], kept for the sweeps
    for m in range(len(bounds)):
        wq = _fake_quantize_groups(torch.clamp(w, lo[m], hi[m]), scheme.bits, scheme.sym)
        delta = w - wq
        err = torch.einsum("ngk,gkl,ngl->ng", delta, C_groups, delta)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, m, best)
        if sweeps:
            deltas.append(delta)
    if sweeps:
        best = _clip_sweeps(torch.stack(deltas), best, C, sweeps)
    pick = best[None, :, :, None]
    return lo.gather(0, pick)[0], hi.gather(0, pick)[0]


def _fake_quantize_groups(w: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """``fake_quantize`` of w [N, G, gs] in groups of gs (the same numbers), without building
    a ``QuantizedWeight``: the clip search calls it once per candidate."""
    scale, zero = compute_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), bits, sym)
    return (quantize_codes(w, scale, zero, bits) - zero) * scale


def _clip_sweeps(deltas: torch.Tensor, best: torch.Tensor, C: torch.Tensor, sweeps: int
                 ) -> torch.Tensor:
    """Coordinate descent for ``search_clip``: deltas [M, N, G, gs] (each candidate's weight
    error), best [N, G] (the chosen candidate), C [K, K]. Returns the new choice."""
    M, N, G, gs = deltas.shape
    rows = torch.arange(N, device=deltas.device)
    delta = deltas[best, rows[:, None], torch.arange(G, device=deltas.device)]  # [N, G, gs]
    for _ in range(sweeps):
        for g in range(G):
            cols = slice(g * gs, (g + 1) * gs)
            others = delta.clone()
            others[:, g] = 0
            # the other groups' error as seen through C's columns of group g: [N, gs]
            cross = others.view(N, G * gs) @ C[:, cols]
            d = deltas[:, :, g]  # [M, N, gs]
            own = ((d @ C[cols, cols]) * d).sum(-1)
            err = own + 2 * (d * cross).sum(-1)  # [M, N]
            best[:, g] = err.argmin(0)
            delta[:, g] = deltas[best[:, g], rows, g]
    return best


def apply_clip(weight: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """weight [N, K] clamped per (channel, group) to bounds (lo, hi), each [N, G, 1]."""
    N, K = weight.shape
    lo, hi = bounds
    G = lo.shape[1]
    return torch.clamp(weight.view(N, G, K // G), lo, hi).view(N, K)

