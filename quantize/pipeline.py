"""Layer-by-layer quantization: calibration windows flow through the model one decoder layer
at a time, so memory stays near one layer's weights plus the windows' hidden states.

For each layer: one forward pass collects what the method needs about each linear's inputs
(Hessians for GPTQ, magnitudes and second moments for AWQ, maxima for SmoothQuant); the method
rewrites the layer (folded scales) and quantizes its seven linears; a second forward pass
through the *quantized* layer produces the next layer's inputs, so later layers calibrate
against the errors of earlier ones, as GPTQ does (``float_inputs``: AutoAWQ's way, the
unquantized layer's output).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

from engine_torch.layers import rope_inv_freq, rotary_cos_sin
from quantize import awq
from quantize.calibration import calibration_windows
from quantize.decoder_layer import (
    ATTN_IN,
    LINEARS,
    MIXED_V,
    MLP_IN,
    attention,
    layer_forward,
    layer_tensors,
    mlp,
)
from quantize.gptq import HessianAccumulator, gptq_quantize
from quantize.smoothing import fold_scales, scale_groups, smoothquant_scales
from twinfer.quant import QuantizedWeight, QuantScheme, quantize_rtn
from twinfer.weights import ModelWeights

METHODS = ("rtn", "awq", "gptq", "smoothquant", "autoround")
# The linear whose input each statistic describes; the others share it.
_INPUT_OF = {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
             "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
             "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj",
             "mlp.down_proj": "mlp.down_proj"}
# GPTQ's true-sequential order: each stage is quantized on inputs through the ones before.
_STAGES = (ATTN_IN, ("self_attn.o_proj",), MLP_IN, ("mlp.down_proj",))


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything ``quantize_model`` needs besides the weights."""

    method: str
    scheme: QuantScheme
    calib: str = "default"
    calib_samples: int = 128
    calib_seqlen: int = 512
    seed: int = 0
    device: str = "cpu"
    # GPTQ: quantize columns by decreasing Hessian diagonal (desc_act). On by default: SmolLM2
    # w4a16 g64 1.138 -> 1.113 P; engine_fast folds every activation gather it implies.
    act_order: bool = True
    damp: float = 0.01  # GPTQ: dampening, a fraction of the mean Hessian diagonal
    # GPTQ: search each group's range instead of taking its min / max, and fold AWQ's searched
    # input scales in first; on by default: SmolLM2 w4a16 g64, 1.165 -> 1.138 P (act-order:
    # 1.131 -> 1.113), see bench/RESULTS.md.
    mse: bool = True
    awq_scales: bool = True
    true_sequential: bool = False  # GPTQ: re-collect inputs after each stage (_STAGES)
    # Calibrate every layer on the unquantized model's hidden states (AutoAWQ: the next
    # layer's inputs come from the layer before it is quantized) instead of on hidden states
    # through the quantized earlier layers (GPTQ, and the default here).
    float_inputs: bool = False
    # AWQ (and GPTQ's awq_scales): judge the q/k/v and gate/up scales by the output of the
    # whole attention / MLP block, as AutoAWQ does, instead of each linear's own output.
    awq_block_loss: bool = False
    # AWQ (and GPTQ's awq_scales): under GQA also search o_proj's input scales, one per v row
    # (shared by the query heads reading it), folded into v_proj (quantize.smoothing).
    awq_o_scales: bool = False
    # AWQ's clip search: coordinate-descent passes over each channel's groups for the
    # channel's whole output error (awq.search_clip's sweeps), and candidates that shrink a
    # group's min and max independently, and q_proj / k_proj clipped too (AutoAWQ leaves them
    # alone); on by default: SmolLM2 w4a16 g64, 1.166 -> 1.142 -> 1.129 P (bench/RESULTS.md).
    awq_clip_sweeps: int = 2
    awq_clip_both_ends: bool = True
    awq_clip_qk: bool = True
    # AWQ: judge each scale candidate by its output error after a clip search (grid 20, no
    # sweeps) instead of after plain rounding (awq.search_scale's clip).
    awq_scale_after_clip: bool = False
    # AWQ's scale candidates (and GPTQ's awq_scales): besides mean|x|^a, AutoAWQ's "duo"
    # mean|x|^a / mean|w|^(1-a) for the same grid of a. Off by default: SmolLM2 w4a16 g64 over
    # three calibration seeds, AWQ 1.139 -> 1.134 P (lower on every seed), GPTQ 1.115 ->
    # 1.113 P (bench/RESULTS.md).
    awq_duo: bool = False
    alpha: float = 0.5  # SmoothQuant migration strength
    batch_size: int = 8  # calibration windows per forward pass

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose {', '.join(METHODS)} "
                             "(autoround runs through quantize.autoround)")
        if self.method == "smoothquant" and self.scheme.act_bits != 8:
            raise ValueError("smoothquant produces W8A8: use --wbits 8 --abits 8")
        if self.scheme.act_bits == 8 and self.method != "smoothquant":
            raise ValueError("8-bit activations come from --method smoothquant")


@dataclass
class QuantizedModel:
    """A quantized model in memory: canonical linears plus every other tensor (HF names)."""

    source: ModelWeights
    options: QuantizeOptions
    linears: dict[str, QuantizedWeight]
    dense: dict[str, torch.Tensor]


class _InputStats:
    """What one forward pass learns about the inputs of a layer's linears."""

    def __init__(self, method: str, device, blocks: dict | None = None):
        self.method, self.device = method, device
        # AWQ's block loss: {group of linears: block(t, h)}, and the block's input batches h
        self.blocks = blocks or {}
        self.keep = {linears[0] for linears in self.blocks}
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.hessian: dict[str, HessianAccumulator] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.abs_max: dict[str, torch.Tensor] = {}
        self.count = 0

    def observe(self, name: str, x: torch.Tensor) -> None:
        if name == MIXED_V:  # [Hkv, rows, K]: one Hessian per KV head's v rows
            self.hessian.setdefault(name, HessianAccumulator(x.shape[-1], self.device,
                                                             x.shape[0])).add(x)
            return
        if name in self.keep:
            self.inputs.setdefault(name, []).append(x)
        if _INPUT_OF[name] != name:
            return
        x = x.reshape(-1, x.shape[-1])
        if self.method in ("gptq", "awq"):  # AWQ's errors are quadratic forms in H / 2
            self.hessian.setdefault(name, HessianAccumulator(x.shape[1], self.device)).add(x)
        if self.method == "smoothquant":
            m = x.abs().amax(0)
            self.abs_max[name] = torch.maximum(self.abs_max[name], m) if name in self.abs_max \
                else m
        elif self.method in ("awq", "gptq"):  # GPTQ needs it only with awq_scales; it is cheap
            s = x.abs().sum(0)
            self.abs_sum[name] = self.abs_sum[name] + s if name in self.abs_sum else s
        if name == "self_attn.q_proj":
            self.count += x.shape[0]

    def mean_abs(self, name: str) -> torch.Tensor:
        return self.abs_sum[name] / self.count

    def second_moment(self, name: str) -> torch.Tensor:
        """E[x^T x] over every calibration token: [K, K] ([Hkv, K, K] for ``MIXED_V``)."""
        return self.hessian[name].H / 2


def quantize_model(weights: ModelWeights, tokenizer, options: QuantizeOptions,
                   progress: bool = True, windows: torch.Tensor | None = None,
                   num_layers: int | None = None) -> QuantizedModel:
    """Quantize every decoder-layer linear of ``weights`` with ``options.method``.

    ``windows`` (int64 [n, T]) replaces the calibration text when given; ``num_layers`` stops
    after that many layers (benchmarks time a few layers of a large model).
    """
    cfg, device = weights.config, torch.device(options.device)
    for i in range(cfg.num_layers):  # fail on a bad group size before any work
        for name in LINEARS:
            w = weights.tensors.get(f"model.layers.{i}.{name}.weight")
            if w is not None:
                options.scheme.group_size_for(w.shape[1], f"model.layers.{i}.{name}")
    linear_names = {f"model.layers.{i}.{n}.weight" for i in range(cfg.num_layers)
                    for n in LINEARS}
    dense = {k: v for k, v in weights.tensors.items()
             if k not in linear_names and not k.startswith("model.layers.")}
    linears: dict[str, QuantizedWeight] = {}

    x = cos = sin = None
    if options.method != "rtn":
        if windows is None:
            windows = calibration_windows(tokenizer, options.calib, options.calib_samples,
                                          options.calib_seqlen, options.seed)
        embed = weights.get("model.embed_tokens.weight")
        x = embed[windows.to(embed.device)].to(device, torch.float32)  # [n, T, hidden]
        positions = torch.arange(windows.shape[1], device=device)
        cos, sin = rotary_cos_sin(positions, rope_inv_freq(cfg).to(device), torch.float32)

    layers = tqdm(range(num_layers or cfg.num_layers), desc=f"{options.method} {options.scheme.name}",
                  unit="layer", disable=not progress)
    for i in layers:
        t = layer_tensors(weights.tensors, cfg, i, device)
        if options.method == "rtn":
            q = {n: quantize_rtn(t[n + ".weight"], options.scheme, f"model.layers.{i}.{n}")
                 for n in LINEARS}
        else:
            collect = partial(_collect_stats, cfg, t, x, cos, sin, options)
            if options.float_inputs:  # before the method folds scales into t (in place)
                x_next = _forward(cfg, t, x, cos, sin, options.batch_size, None)
            q = _METHODS[options.method](cfg, t, collect, options, f"model.layers.{i}")
            for name, qw in q.items():
                t[name + ".weight"] = qw.dequantize()
            x = x_next if options.float_inputs else _forward(
                cfg, t, x, cos, sin, options.batch_size, None,
                act_int8=options.scheme.act_bits == 8)
        for name, qw in q.items():
            linears[f"model.layers.{i}.{name}"] = qw.to("cpu")
        for k, v in t.items():
            if k.removesuffix(".weight") not in LINEARS:
                dense[f"model.layers.{i}.{k}"] = v.cpu()
    return QuantizedModel(weights, options, linears, dense)


def _collect_stats(cfg, t, x, cos, sin, options: QuantizeOptions,
                   mixed_v: bool = True) -> _InputStats:
    """One forward pass of the windows' hidden states x through layer t as it is now;
    ``mixed_v=False`` skips v's attention-mixed inputs (costly; later GPTQ stages lack v)
    and the block inputs (only the first pass searches scales)."""
    scales = options.method == "awq" or (options.method == "gptq" and options.awq_scales)
    blocks = None
    if scales and options.awq_block_loss and mixed_v:
        blocks = {ATTN_IN: lambda tq, h: attention(cfg, tq, h, cos, sin), MLP_IN: mlp}
    stats = _InputStats(options.method, x.device, blocks)
    _forward(cfg, t, x, cos, sin, options.batch_size, stats.observe,
             observe_mixed_v=mixed_v and options.method in ("gptq", "awq"))
    return stats


@torch.no_grad()
def _forward(cfg, t, x, cos, sin, batch_size, observe, act_int8=False,
             observe_mixed_v=False) -> torch.Tensor:
    out = [layer_forward(cfg, t, x[b:b + batch_size], cos, sin, observe, act_int8,
                         observe_mixed_v)
           for b in range(0, x.shape[0], batch_size)]
    return torch.cat(out)


def _gptq(cfg, t, collect, options: QuantizeOptions, prefix: str):
    # GPTQ is blind to H's scale (damping is relative), so the second moment serves as H.
    stats = collect()
    C = {n: _error_moment(stats, n) for n in LINEARS}
    if options.awq_scales:
        _fold_awq_scales(cfg, t, stats, options.scheme, C, options.awq_o_scales,
                         duo=options.awq_duo)
    q: dict[str, QuantizedWeight] = {}
    for stage in _STAGES if options.true_sequential else (LINEARS,):
        if q:  # true-sequential: this stage's inputs come through the quantized earlier ones
            for n, qw in q.items():
                t[n + ".weight"] = qw.dequantize()
            stats = collect(mixed_v=False)
            C = {n: _error_moment(stats, n) for n in stage}
        # Act-order sorts by one key per shared input (for q/k/v: v's error moment, the
        # widest), so that linears fused at load time get one g_idx.
        order = {n: C["self_attn.v_proj" if n in ATTN_IN else n] for n in stage}
        order = {n: c.reshape(-1, *c.shape[-2:]).diagonal(dim1=-2, dim2=-1).sum(0)
                 for n, c in order.items()}
        q.update({n: gptq_quantize(t[n + ".weight"], C[n], options.scheme, f"{prefix}.{n}",
                                   options.act_order, options.damp, order_by=order[n],
                                   mse=options.mse)
                  for n in stage})
    return q


def _error_moment(stats: _InputStats, name: str) -> torch.Tensor:
    """The second moment [K, K] (v_proj: [Hkv, K, K]) that ``name``'s quantization error is
    weighed with. For v_proj: its inputs as the attention mixes them, per KV head, plus the
    raw inputs. The raw inputs alone nearly ignore the first token (1 row in T), yet most of
    every query's attention lands on it (the attention sink), so GPTQ pushed v's error into
    that token's directions (SmolLM2-135M: v's error on the sink up to 35x RTN's; GPTQ on v
    alone worse than RTN). The raw term keeps short contexts, whose mixing differs, covered."""
    raw = stats.second_moment(_INPUT_OF[name])
    if name == "self_attn.v_proj":
        return stats.second_moment(MIXED_V) + raw
    return raw


def _smoothquant(cfg, t, collect, options: QuantizeOptions, prefix: str):
    stats = collect()
    for group in scale_groups(cfg):
        absmax = stats.abs_max[_INPUT_OF[group.linears[0]]]
        s = smoothquant_scales(absmax, [t[n + ".weight"] for n in group.linears], options.alpha)
        fold_scales(t, group, s)
    return {n: quantize_rtn(t[n + ".weight"], options.scheme, f"{prefix}.{n}") for n in LINEARS}


def _awq(cfg, t, collect, options: QuantizeOptions, prefix: str):
    stats = collect()
    # Each linear's error moment (see _error_moment), rescaled as scales fold into its input.
    C = {n: _error_moment(stats, n) for n in LINEARS}
    _fold_awq_scales(cfg, t, stats, options.scheme, C, options.awq_o_scales,
                     clip={} if options.awq_scale_after_clip else None, duo=options.awq_duo)
    q = {}
    for n in LINEARS:
        w = t[n + ".weight"]
        if options.awq_clip_qk or n not in ("self_attn.q_proj", "self_attn.k_proj"):
            w = awq.apply_clip(w, awq.search_clip(C[n], w, options.scheme, f"{prefix}.{n}",
                                                  sweeps=options.awq_clip_sweeps,
                                                  both_ends=options.awq_clip_both_ends))
        q[n] = quantize_rtn(w, options.scheme, f"{prefix}.{n}")
    return q


def _fold_awq_scales(cfg, t, stats: _InputStats, scheme: QuantScheme,
                     C: dict[str, torch.Tensor], shared_v: bool = False,
                     clip: dict | None = None, duo: bool = False) -> None:
    """AWQ's scale search for each group of linears sharing an input; folds the scales into
    the layer ``t`` and rescales each linear's error moment in ``C`` (both in place).

    Each candidate is judged by the linears' own output error (quadratic forms in C) or,
    where ``stats`` kept the block's inputs (``awq_block_loss``), by the output error of the
    attention block (q/k/v) or MLP block (gate/up) with those linears fake-quantized.
    ``shared_v``: see ``QuantizeOptions.awq_o_scales``; ``clip``, ``duo``: see
    ``awq.search_scale``."""
    for group in scale_groups(cfg, shared_v):
        weights = [t[n + ".weight"] for n in group.linears]
        x_mean_abs = stats.mean_abs(_INPUT_OF[group.linears[0]])
        if group.linears in stats.blocks:
            loss = awq.block_output_error(stats.blocks[group.linears], t, group.linears,
                                          stats.inputs[group.linears[0]])
            s = awq.search_scale_by(loss, x_mean_abs, weights, scheme, duo=duo)
        else:
            s = awq.search_scale([C[n] for n in group.linears], x_mean_abs, weights, scheme,
                                 foldable=group.foldable, clip=clip, duo=duo)
        fold_scales(t, group, s)
        for n in group.linears:
            C[n] = C[n] / (s[:, None] * s[None, :])  # inputs are now x / s


_METHODS = {"gptq": _gptq, "smoothquant": _smoothquant, "awq": _awq}
