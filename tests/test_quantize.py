"""quantize/: the methods reduce error where they claim to, the calibration forward is the
engine's forward, and a saved checkpoint computes what its fake-quantized weights compute."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import collect_logits
from safetensors.torch import save_file

from engine_torch.layers import rms_norm, rope_inv_freq, rotary_cos_sin
from quantize import pipeline
from quantize.awq import (
    apply_clip,
    block_output_error,
    search_clip,
    search_scale,
    search_scale_by,
)
from quantize.calibration import CalibrationError, calibration_windows, load_calibration_texts
from quantize.cli import quantize_checkpoint
from quantize.decoder_layer import ATTN_IN, MIXED_V, attention, layer_forward, layer_tensors
from quantize.gptq import HessianAccumulator, gptq_quantize, mse_qparams
from quantize.pipeline import QuantizeOptions, quantize_model
from quantize.smoothing import fold_scales, scale_groups
from twinfer.cli import main as cli_main
from twinfer.quant import QuantScheme, compute_qparams, fake_quantize, quantize_codes
from twinfer.tokenizer import Tokenizer
from twinfer.weights import load_weights

PROMPTS = [[0, 5, 9, 33, 7, 100, 200, 3, 4], [0, 17, 250, 11]]


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    """Text in the tiny models' word vocabulary ("w2" ... "w255")."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    docs = [" ".join(f"w{rng.randrange(2, 256)}" for _ in range(300)) for _ in range(20)]
    path.write_text("\n\n".join(docs))
    return path


def correlated_inputs(n=512, k=128, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    scales = torch.rand(k, generator=g) * 3 + 0.1
    return (torch.randn(n, k, generator=g) @ mix) * scales


def block_moments(x: torch.Tensor, blocks: int) -> torch.Tensor:
    """[blocks, K, K] second moments of x, each block's a different multiple (as v_proj's
    per-KV-head moments differ)."""
    return torch.stack([x.t() @ x / len(x) * (1 + b) for b in range(blocks)])


def output_error(x, w, w_hat) -> float:
    return (x @ (w - w_hat).t()).pow(2).mean().item()


def test_gptq_has_lower_output_error_than_rtn():
    x, w = correlated_inputs(), torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    acc = HessianAccumulator(128, "cpu")
    for chunk in x.split(100):
        acc.add(chunk)
    scheme = QuantScheme(4, 32, sym=False)
    gptq = gptq_quantize(w, acc.H, scheme, "l").dequantize()
    rtn = fake_quantize(w, scheme)
    assert output_error(x, w, gptq) < 0.7 * output_error(x, w, rtn)


def test_hessian_accumulator_equals_two_xtx_over_n():
    x = correlated_inputs(n=300)
    acc = HessianAccumulator(128, "cpu")
    for chunk in x.split(70):
        acc.add(chunk)
    torch.testing.assert_close(acc.H, 2 * x.t() @ x / 300, rtol=1e-4, atol=1e-4)


def test_gptq_with_per_block_hessians_equals_one_call_per_block():
    x, w = correlated_inputs(), torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    H = torch.stack([2 * x[:256].t() @ x[:256] / 256, 2 * x[256:].t() @ x[256:] / 256])
    scheme = QuantScheme(4, 32, sym=False)
    both = gptq_quantize(w, H, scheme, "l")
    halves = [gptq_quantize(w[:32], H[0], scheme, "l"), gptq_quantize(w[32:], H[1], scheme, "l")]
    torch.testing.assert_close(both.dequantize(), torch.cat([h.dequantize() for h in halves]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_mixed_v_inputs_reproduce_the_attention_output(tiny_model_factory, arch):
    # GPTQ weighs v_proj's error with these inputs' Hessian, so mixed @ W_v^T must be exactly
    # what o_proj reads: each query head's attention over v.
    weights = load_weights(tiny_model_factory(arch))
    cfg = weights.config
    t = layer_tensors(weights.tensors, cfg, 0, "cpu")
    x = torch.randn(2, 9, cfg.hidden_size)
    cos, sin = rotary_cos_sin(torch.arange(9), rope_inv_freq(cfg), torch.float32)
    seen = {}
    layer_forward(cfg, t, x, cos, sin, lambda name, a: seen.setdefault(name, a),
                  observe_mixed_v=True)
    H, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    w_v = t["self_attn.v_proj.weight"].view(Hkv, D, -1)
    mixed = seen[MIXED_V].view(Hkv, 2, H // Hkv, 9, -1)  # [Hkv, B, heads per KV head, T, K]
    out = (mixed @ w_v.transpose(1, 2)[:, None, None]).permute(1, 3, 0, 2, 4)  # [B, T, ...]
    torch.testing.assert_close(out.reshape(2, 9, H * D), seen["self_attn.o_proj"],
                               rtol=1e-4, atol=1e-5)


def test_gptq_act_order_records_groups_and_beats_rtn():
    x, w = correlated_inputs(), torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    acc = HessianAccumulator(128, "cpu")
    acc.add(x)
    scheme = QuantScheme(4, 32, sym=True)
    qw = gptq_quantize(w, acc.H, scheme, "l", act_order=True)
    assert qw.g_idx is not None and sorted(torch.bincount(qw.g_idx).tolist()) == [32] * 4
    assert output_error(x, w, qw.dequantize()) < output_error(x, w, fake_quantize(w, scheme))


@pytest.mark.parametrize("sym", [False, True])
def test_mse_group_range_is_never_worse_than_min_max(sym):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, 64, 64, generator=g)
    w[:, :, 7] *= 6  # an outlier per group stretches the min / max range
    w[0, 0] = 0  # an all-zero group must survive the search

    def group_error(scale, zero):
        return ((quantize_codes(w, scale, zero, 4) - zero) * scale - w).abs().pow(2.4).sum(-1)

    mse = group_error(*mse_qparams(w, 4, sym))
    min_max = group_error(*compute_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True),
                                           4, sym))
    assert (mse <= min_max + 1e-6).all() and mse.sum() < min_max.sum()
    in_slices = mse_qparams(w, 4, sym, chunk=80 * 64 * 5)  # 5 groups at a time
    for a, b in zip(in_slices, mse_qparams(w, 4, sym)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gptq_with_mse_ranges_beats_rtn():
    x, w = correlated_inputs(), torch.randn(64, 128, generator=torch.Generator().manual_seed(6))
    acc = HessianAccumulator(128, "cpu")
    acc.add(x)
    scheme = QuantScheme(4, 32, sym=False)
    qw = gptq_quantize(w, acc.H, scheme, "l", act_order=True, mse=True)
    assert output_error(x, w, qw.dequantize()) < output_error(x, w, fake_quantize(w, scheme))


def test_awq_scale_search_protects_salient_channels():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 128, generator=g)
    x[:, :4] *= 30  # a few outlier input channels, as in real activations
    w = torch.randn(64, 128, generator=g)
    scheme = QuantScheme(4, 32, sym=False)
    s = search_scale(x.t() @ x / len(x), x.abs().mean(0), [w], scheme)
    awq = fake_quantize(w * s, scheme) / s
    assert output_error(x, w, awq) < 0.8 * output_error(x, w, fake_quantize(w, scheme))


def test_awq_scales_without_duo_are_a_power_of_the_input_magnitude():
    # Without AutoAWQ's weight-aware candidates every candidate is mean|x|^a (times a
    # constant that centres it), so log s is a line in log mean|x|.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 128, generator=g)
    x[:, :4] *= 30
    w = torch.randn(64, 128, generator=g)
    w[:, 10] *= 20  # a weight-magnitude outlier that only the duo candidates look at
    x_mean_abs = x.abs().mean(0)
    s = search_scale(x.t() @ x / len(x), x_mean_abs, [w], QuantScheme(4, 32, sym=False),
                     duo=False)
    a = torch.linalg.lstsq(torch.stack([x_mean_abs.log(), torch.ones(128)], 1),
                           s.log()[:, None]).solution[:, 0]
    torch.testing.assert_close(a[0] * x_mean_abs.log() + a[1], s.log(), rtol=0, atol=1e-4)


def test_awq_clip_search_never_increases_group_error():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(256, 128, generator=g), torch.randn(64, 128, generator=g)
    w[:, 5] *= 8  # an outlier weight stretches its group's range
    scheme = QuantScheme(4, 32, sym=False)
    clipped = fake_quantize(apply_clip(w, search_clip(x.t() @ x / len(x), w, scheme, "l")),
                            scheme)
    assert output_error(x, w, clipped) <= output_error(x, w, fake_quantize(w, scheme)) + 1e-9


@pytest.mark.parametrize("blocks", [1, 2])
def test_awq_clip_sweeps_lower_the_whole_output_error(blocks):
    # The plain search weighs each group alone; the sweeps account for how groups' errors
    # combine in one output channel (C's off-diagonal blocks), so they can only do better.
    x = correlated_inputs(k=256)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(6))
    C = block_moments(x, blocks)
    scheme = QuantScheme(4, 64, sym=False)

    def error(sweeps):
        bounds = search_clip(C, w, scheme, "l", sweeps=sweeps)
        delta = (w - fake_quantize(apply_clip(w, bounds), scheme)).view(blocks, -1, 256)
        return ((delta @ C) * delta).sum()

    assert error(1) < error(0)
    assert error(2) <= error(1) + 1e-6


@pytest.mark.parametrize("blocks", [1, 2])
def test_awq_clip_search_in_row_chunks_chooses_what_one_pass_chooses(blocks):
    # Output channels are independent: searching them a few at a time (bounded memory for
    # the sweeps) must change nothing, also where rows are split across moments.
    x = correlated_inputs(k=128)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(8))
    C = block_moments(x, blocks)
    scheme = QuantScheme(4, 32, sym=False)
    whole = search_clip(C, w, scheme, "l", sweeps=1, both_ends=True)
    chunked = search_clip(C, w, scheme, "l", sweeps=1, both_ends=True, max_rows=5)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_awq_clip_both_ends_lowers_the_output_error():
    # Shrinking min and max by different factors is a superset of the diagonal candidates.
    x = correlated_inputs(k=256)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(7))
    C = x.t() @ x / len(x)
    scheme = QuantScheme(4, 64, sym=False)
    clipped = {both: fake_quantize(apply_clip(w, search_clip(C, w, scheme, "l",
                                                            both_ends=both)), scheme)
               for both in (False, True)}
    assert output_error(x, w, clipped[True]) < output_error(x, w, clipped[False])


def test_awq_scale_after_clip_gives_no_larger_clipped_error():
    # Judging each scale candidate after its clip search can only lower the error after
    # that same clip search (the plain judge picks from the same candidates).
    x = correlated_inputs(k=128)
    x[:, :3] *= 20
    C = x.t() @ x / len(x)
    ws = [torch.randn(n, 128, generator=torch.Generator().manual_seed(9 + n)) for n in (32, 48)]
    scheme = QuantScheme(4, 32, sym=False)

    def clipped_error(s):
        err = 0.0
        for w in ws:
            Cs, w_s = C / (s[:, None] * s[None, :]), w * s
            q = fake_quantize(apply_clip(w_s, search_clip(Cs, w_s, scheme, "l")), scheme) / s
            err += output_error(x, w, q)
        return err

    plain = search_scale(C, x.abs().mean(0), ws, scheme)
    after = search_scale(C, x.abs().mean(0), ws, scheme, clip={})
    assert clipped_error(after) <= clipped_error(plain) + 1e-9


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_folding_scales_preserves_the_layer_function(tiny_model_factory, arch):
    weights = load_weights(tiny_model_factory(arch))
    cfg = weights.config
    t = {k: v.double() for k, v in layer_tensors(weights.tensors, cfg, 0, "cpu").items()}
    x = torch.randn(2, 10, cfg.hidden_size, dtype=torch.float64)
    cos, sin = rotary_cos_sin(torch.arange(10), rope_inv_freq(cfg), torch.float64)
    before = layer_forward(cfg, t, x, cos, sin)
    for group in scale_groups(cfg, shared_v=True):  # o_proj's group too, under GQA
        k = t[group.linears[0] + ".weight"].shape[1]
        fold_scales(t, group, group.foldable(torch.rand(k, dtype=torch.float64) * 4 + 0.25))
    torch.testing.assert_close(layer_forward(cfg, t, x, cos, sin), before, rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_calibration_forward_equals_engine_forward(tiny_model_factory, arch):
    path = tiny_model_factory(arch)
    weights = load_weights(path)
    cfg = weights.config
    ids = torch.tensor([PROMPTS[0]])
    x = weights.get("model.embed_tokens.weight")[ids]
    cos, sin = rotary_cos_sin(torch.arange(ids.shape[1]), rope_inv_freq(cfg), torch.float32)
    for i in range(cfg.num_layers):
        x = layer_forward(cfg, layer_tensors(weights.tensors, cfg, i, "cpu"), x, cos, sin)
    head = weights.tensors.get("lm_head.weight", weights.get("model.embed_tokens.weight"))
    logits = rms_norm(x, weights.get("model.norm.weight"), cfg.rms_norm_eps)[0] @ head.t()
    torch.testing.assert_close(logits, collect_logits(path, PROMPTS[:1], 64)[0], rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("float_inputs", [False, True])
def test_float_inputs_calibrate_later_layers_on_the_unquantized_hidden_states(
        tiny_model_factory, monkeypatch, float_inputs):
    # AutoAWQ calibrates layer i on the float model's hidden states; GPTQ (the default) on
    # hidden states through the already quantized layers 0 .. i - 1.
    weights = load_weights(tiny_model_factory("llama"))
    cfg = weights.config
    windows = torch.tensor([PROMPTS[0]])
    cos, sin = rotary_cos_sin(torch.arange(windows.shape[1]), rope_inv_freq(cfg), torch.float32)
    x0 = weights.get("model.embed_tokens.weight")[windows].float()
    float_x1 = layer_forward(cfg, layer_tensors(weights.tensors, cfg, 0, "cpu"), x0, cos, sin)
    seen = []
    collect = pipeline._collect_stats

    def spy(cfg, t, x, *args, **kwargs):
        seen.append(x.clone())
        return collect(cfg, t, x, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_collect_stats", spy)
    options = QuantizeOptions("awq", QuantScheme(4, 32, False), float_inputs=float_inputs)
    quantize_model(weights, None, options, progress=False, windows=windows, num_layers=2)
    assert len(seen) == 2
    assert torch.allclose(seen[1], float_x1, rtol=1e-5, atol=1e-5) is float_inputs


def test_calibration_windows_are_deterministic_per_seed(tiny_model_factory, calib_file):
    tok = Tokenizer.load(tiny_model_factory("llama"))
    a = calibration_windows(tok, str(calib_file), 8, 32, seed=0)
    assert a.shape == (8, 32)
    assert torch.equal(a, calibration_windows(tok, str(calib_file), 8, 32, seed=0))
    assert not torch.equal(a, calibration_windows(tok, str(calib_file), 8, 32, seed=1))


def test_default_calibration_text_ships_with_python():
    assert sum(len(t) for t in load_calibration_texts("default")) > 100_000


def test_bad_calibration_sources_are_named(tmp_path):
    with pytest.raises(CalibrationError, match="nope.txt"):
        load_calibration_texts(str(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(CalibrationError, match="bad.jsonl:2"):
        load_calibration_texts(str(bad))


def fake_quantized_checkpoint(quant_dir: Path, out: Path) -> Path:
    """The dense checkpoint a quantized one stands for: every quantized linear dequantized."""
    weights = load_weights(quant_dir)
    tensors = {}
    for name, t in weights.tensors.items():
        prefix, _, kind = name.rpartition(".")
        if kind in ("qweight", "weight_scale") or (kind == "weight" and t.dtype == torch.int8):
            tensors[prefix + ".weight"] = weights.quantized_linear(prefix).dequantize()
        elif kind not in ("qzeros", "scales", "g_idx"):
            tensors[name] = t.float()
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"))
    cfg = json.loads((quant_dir / "config.json").read_text())
    del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    for f in quant_dir.glob("tokenizer*"):
        shutil.copy(f, out)
    return out


CASES = {
    "rtn-w4-g32-asym": ("rtn", QuantScheme(4, 32, False)),
    "rtn-w8-channel": ("rtn", QuantScheme(8, -1, True)),
    "gptq-w4-g32-sym-actorder": ("gptq", QuantScheme(4, 32, True)),
    "gptq-w4-g32-actorder-mse-awqscales-trueseq": ("gptq", QuantScheme(4, 32, False)),
    "awq-w4-g32": ("awq", QuantScheme(4, 32, False)),
    "awq-w4-g32-blockloss": ("awq", QuantScheme(4, 32, False)),
    "awq-w4-g32-oscales": ("awq", QuantScheme(4, 32, False)),
    "awq-w4-g32-scaleclip": ("awq", QuantScheme(4, 32, False)),
    "smoothquant-w8a8": ("smoothquant", QuantScheme(8, -1, True, act_bits=8)),
}


def case_options(case: str, calib_file: Path, device: str = "cpu") -> QuantizeOptions:
    """The options a CASES entry names (a little calibration)."""
    method, scheme = CASES[case]
    return QuantizeOptions(method, scheme, calib=str(calib_file), calib_samples=8,
                           calib_seqlen=64, device=device, act_order="actorder" in case,
                           mse="mse" in case, awq_scales="awqscales" in case,
                           true_sequential="trueseq" in case,
                           awq_block_loss="blockloss" in case,
                           awq_o_scales="oscales" in case,
                           awq_scale_after_clip="scaleclip" in case)


@pytest.fixture(scope="module")
def quantized_tiny(tiny_model_factory, calib_file, tmp_path_factory):
    """Each CASES entry quantized from the tiny llama on the CPU and saved."""
    cache = {}

    def get(case: str) -> Path:
        if case not in cache:
            out = tmp_path_factory.mktemp(case) / "q"
            quantize_checkpoint(str(tiny_model_factory("llama")), out,
                                case_options(case, calib_file), progress=False)
            cache[case] = out
        return cache[case]

    return get


WEIGHT_ONLY = [c for c in CASES if CASES[c][1].act_bits == 16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(CASES))
def test_quantizing_on_the_gpu_gives_the_checkpoint_the_cpu_gives(
        quantized_tiny, tiny_model_factory, calib_file, tmp_path, case):
    """``--device cuda`` runs every method (and its searches) on the GPU; float32 sums in
    another order may flip a near-tie in a search, so the logits, not the codes, must agree."""
    out = tmp_path / "q"
    quantize_checkpoint(str(tiny_model_factory("llama")), out,
                        case_options(case, calib_file, "cuda"), progress=False)
    for a, b in zip(collect_logits(quantized_tiny(case), PROMPTS, 64),
                    collect_logits(out, PROMPTS, 64)):
        assert (a - b).abs().max() <= 0.02 * a.abs().max()


@pytest.mark.parametrize("case", WEIGHT_ONLY)
def test_saved_checkpoint_matches_its_fake_quantized_weights(quantized_tiny, case, tmp_path):
    qdir = quantized_tiny(case)
    dense = fake_quantized_checkpoint(qdir, tmp_path / "dense")
    for a, b in zip(collect_logits(qdir, PROMPTS, 5), collect_logits(dense, PROMPTS, 5)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_saved_w8a8_checkpoint_matches_simulated_int8_activations(quantized_tiny, tmp_path):
    """The engine's integer W8A8 path against the calibration forward, which rounds
    activations per token and multiplies by the dequantized weights."""
    qdir = quantized_tiny("smoothquant-w8a8")
    dense = load_weights(fake_quantized_checkpoint(qdir, tmp_path / "dense"))
    cfg = dense.config
    ids = torch.tensor([PROMPTS[0]])
    x = dense.get("model.embed_tokens.weight")[ids]
    cos, sin = rotary_cos_sin(torch.arange(ids.shape[1]), rope_inv_freq(cfg), torch.float32)
    for i in range(cfg.num_layers):
        x = layer_forward(cfg, layer_tensors(dense.tensors, cfg, i, "cpu"), x, cos, sin,
                          act_int8=True)
    logits = rms_norm(x, dense.get("model.norm.weight"), cfg.rms_norm_eps)[0] @ \
        dense.get("lm_head.weight").t()
    torch.testing.assert_close(collect_logits(qdir, PROMPTS[:1], 64)[0], logits, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_logits_stay_close_to_the_original(quantized_tiny, tiny_model_factory, case):
    base = collect_logits(tiny_model_factory("llama"), PROMPTS, 64)
    quant = collect_logits(quantized_tiny(case), PROMPTS, 64)
    bound = 0.02 if CASES[case][1].bits == 8 else 0.15  # relative to the logits' spread
    for a, b in zip(base, quant):
        assert (a - b).abs().max() <= bound * a.abs().max()


def test_cli_quantize_then_generate(tiny_model_factory, calib_file, tmp_path, capsys):
    out = tmp_path / "q"
    assert cli_main(["quantize", str(tiny_model_factory("llama")), "--method", "gptq",
                     "--group-size", "32", "--sym", "--calib", str(calib_file),
                     "--calib-samples", "4", "--calib-seqlen", "32", "-o", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "gptq w4a16-g32-sym" in summary and "smaller" in summary
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert cli_main(["generate", str(out), "--prompt", "w5 w6 w7", "--max-tokens", "4",
                     "--ignore-eos"]) == 0
    assert len(capsys.readouterr().out.split()) == 4


def test_cli_rejects_group_size_that_does_not_divide(tiny_model_factory, tmp_path, capsys):
    code = cli_main(["quantize", str(tiny_model_factory("llama")), "--method", "rtn",
                     "--group-size", "48", "-o", str(tmp_path / "q")])
    assert code == 2
    assert "model.layers.0.self_attn.q_proj" in capsys.readouterr().err


def test_quantizing_a_quantized_checkpoint_is_refused(quantized_tiny):
    options = QuantizeOptions("rtn", QuantScheme(4, 32))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(str(quantized_tiny("rtn-w4-g32-asym")), "/nonexistent", options)


def test_autoround_checkpoint_loads_and_stays_close(tiny_model_factory, calib_file, tmp_path):
    """auto-round's own GPTQ export (another tool's bits) read by twinfer's loader."""
    pytest.importorskip("auto_round")
    out = tmp_path / "ar"
    options = QuantizeOptions("autoround", QuantScheme(4, 32, sym=True), calib=str(calib_file),
                              calib_samples=4, calib_seqlen=32)
    summary = quantize_checkpoint(str(tiny_model_factory("llama")), out, options, iters=2,
                                  progress=False)
    assert summary.format == "gptq"
    assert load_weights(out).quantization_config["quant_method"] == "gptq"
    base = collect_logits(tiny_model_factory("llama"), PROMPTS, 64)
    for a, b in zip(base, collect_logits(out, PROMPTS, 64)):
        assert (a - b).abs().max() <= 0.15 * a.abs().max()


@pytest.mark.parametrize("case", list(CASES))
def test_engine_fast_computes_what_engine_torch_computes_on_quantized_checkpoints(
        quantized_tiny, case):
    """Triton quantized GEMMs (interpreter on CPU) against engine_torch's dequantize-and-matmul,
    fp32, chunked prefill plus decode-shaped steps."""
    pytest.importorskip("triton")
    qdir = quantized_tiny(case)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_logits = collect_logits(qdir, PROMPTS, 5, device=device)
    fast_logits = collect_logits(qdir, PROMPTS, 5, device=device, engine="fast")
    for a, b in zip(torch_logits, fast_logits):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_engine_fast_folds_act_order_gathers_into_the_norms_attention_and_gate_up(
        quantized_tiny):
    from engine_fast.model import FastLlama

    model = FastLlama(load_weights(quantized_tiny("gptq-w4-g32-sym-actorder")),
                      torch.device("cpu"), torch.float32)
    for layer in model.layers:
        assert layer.input_norm_perm is not None
        assert layer.post_attention_norm_perm is not None
        assert layer.attention_out_cols is not None
        assert all(lin.input_perm is None for lin in (layer.qkv_proj, layer.o_proj,
                                                      layer.gate_up_proj, layer.down_proj))


@pytest.mark.parametrize("inputs", ["fused-inputs", "separate-inputs"])
@pytest.mark.parametrize("case", ["rtn-w4-g32-asym", "rtn-w8-channel",
                                  "gptq-w4-g32-sym-actorder"])
def test_engine_fast_one_row_decode_matches_engine_torch_on_quantized_checkpoints(
        quantized_tiny, monkeypatch, case, inputs):
    """Batch-1 decode through the one-row quantized GEMVs (the float32 GEMV under the
    interpreter), residual adds fused in, and norms, SiLU-and-mul and act-order gathers
    either fused in too or as separate kernels, gives engine_torch's logits."""
    pytest.importorskip("triton")
    from engine_fast.model import FastLlama

    calls = []
    one_row = FastLlama._forward_one_row
    monkeypatch.setattr(FastLlama, "_forward_one_row",
                        lambda self, *a: calls.append(1) or one_row(self, *a))
    qdir = quantized_tiny(case)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts, decode = PROMPTS[:1], [[3, 4, 5, 6]]
    torch_logits = collect_logits(qdir, prompts, 64, decode, device=device)
    fast_logits = collect_logits(qdir, prompts, 64, decode, device=device, engine="fast",
                                 fuse_one_row=True, fuse_gemv_inputs=inputs == "fused-inputs")
    assert calls  # the decode steps took the fused path
    torch.testing.assert_close(fast_logits[0], torch_logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(CASES))
def test_engine_fast_fp16_on_quantized_checkpoints_matches_engine_torch_on_gpu(
        quantized_tiny, case):
    """fp16 on CUDA: the half2 GEMV for decode rows, the tensor-core kernels for prefill, CUDA
    graphs; both engines round activations to fp16 at different points (as in
    test_fast_parity), so the bound is 1e-2 of the logits' scale."""
    qdir = quantized_tiny(case)
    decode = [[3, 4, 5, 6], [7]]  # the second sequence stops first: one-row decode steps
    torch_logits = collect_logits(qdir, PROMPTS, 5, decode, device="cuda", dtype=torch.float16)
    fast_logits = collect_logits(qdir, PROMPTS, 5, decode, device="cuda", dtype=torch.float16,
                                 engine="fast")
    for a, b in zip(torch_logits, fast_logits):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-2 * max(1.0, a.abs().max().item()))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_awq_block_loss_scales_give_no_larger_attention_error_than_linear_loss(
        tiny_model_factory, arch):
    # --awq-block-loss judges q/k/v's scale by the attention block's output (AutoAWQ); over
    # the same candidates it must do at least as well there as the per-linear loss does.
    weights = load_weights(tiny_model_factory(arch))
    cfg = weights.config
    t = layer_tensors(weights.tensors, cfg, 0, "cpu")
    g = torch.Generator().manual_seed(5)
    h = torch.randn(4, 16, cfg.hidden_size, generator=g)
    h[..., :3] *= 20  # outlier input channels, as in real activations
    cos, sin = rotary_cos_sin(torch.arange(16), rope_inv_freq(cfg), torch.float32)
    block = lambda tq, a: attention(cfg, tq, a, cos, sin)  # noqa: E731
    scheme = QuantScheme(4, 32, sym=False)
    ws = [t[n + ".weight"] for n in ATTN_IN]
    flat = h.reshape(-1, cfg.hidden_size)
    loss = block_output_error(block, t, ATTN_IN, list(h.split(2)))
    s_linear = search_scale(flat.t() @ flat / len(flat), flat.abs().mean(0), ws, scheme)
    s_block = search_scale_by(loss, flat.abs().mean(0), ws, scheme)
    quantized = lambda s: [fake_quantize(w * s, scheme) / s for w in ws]  # noqa: E731
    assert loss(quantized(s_block)) <= loss(quantized(s_linear))
    assert loss(quantized(s_block)) < loss([fake_quantize(w, scheme) for w in ws])


def test_gptq_uses_act_order_unless_told_not_to(tiny_model_factory, calib_file, tmp_path):
    """desc_act is GPTQ's default (it is what meets <= 1.12 P); --no-act-order turns it off,
    and the checkpoint's quantization_config says which."""
    common = ["--method", "gptq", "--group-size", "32", "--calib", str(calib_file),
              "--calib-samples", "2", "--calib-seqlen", "16"]
    model = str(tiny_model_factory("llama"))
    for flag, desc_act in (([], True), (["--no-act-order"], False)):
        out = tmp_path / f"q{desc_act}"
        assert cli_main(["quantize", model, *common, *flag, "-o", str(out)]) == 0
        assert load_weights(out).quantization_config["desc_act"] is desc_act


def test_quant_swap_takes_the_named_units_of_the_named_layers_from_the_other_checkpoint(
        quantized_tiny):
    from bench.quant_swap import swapped_tensors

    base = load_weights(quantized_tiny("rtn-w4-g32-asym"))
    other = load_weights(quantized_tiny("awq-w4-g32"))
    t = swapped_tensors(base, other, ["mlp"], range(1, 2))
    assert torch.equal(t["model.layers.1.mlp.up_proj.weight"],
                       other.quantized_linear("model.layers.1.mlp.up_proj").dequantize())
    assert torch.equal(t["model.layers.1.post_attention_layernorm.weight"],
                       other.get("model.layers.1.post_attention_layernorm.weight").float())
    assert torch.equal(t["model.layers.0.mlp.up_proj.weight"],
                       base.quantized_linear("model.layers.0.mlp.up_proj").dequantize())
    assert torch.equal(t["model.layers.1.self_attn.q_proj.weight"],
                       base.quantized_linear("model.layers.1.self_attn.q_proj").dequantize())
    assert not any(name.endswith((".qweight", ".scales")) for name in t)


def test_quant_swap_of_one_linear_keeps_base_norm_and_the_others_function_of_the_input(
        quantized_tiny):
    """AWQ folds its scales into the norm: OTHER's q under BASE's norm is rescaled per column."""
    from bench.quant_swap import swapped_tensors

    base = load_weights(quantized_tiny("rtn-w4-g32-asym"))
    other = load_weights(quantized_tiny("awq-w4-g32"))
    t = swapped_tensors(base, other, ["q"], range(2))
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(t[norm], base.get(norm).float())
    assert not torch.allclose(base.get(norm).float(), other.get(norm).float())
    q = other.quantized_linear("model.layers.0.self_attn.q_proj").dequantize()
    torch.testing.assert_close(t["model.layers.0.self_attn.q_proj.weight"] * t[norm],
                               q * other.get(norm).float())


def test_quant_swap_writes_a_dense_checkpoint_that_loads_and_scores_as_its_base(
        quantized_tiny, tmp_path):
    from bench.quant_swap import main as quant_swap

    base_dir = quantized_tiny("rtn-w4-g32-asym")
    quant_swap([str(base_dir), str(quantized_tiny("awq-w4-g32")), str(tmp_path / "out")])
    dense, base = load_weights(tmp_path / "out"), load_weights(base_dir)
    assert dense.quantization_config is None and dense.config == base.config
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(dense.get(name + ".weight"), base.quantized_linear(name).dequantize())


def test_quant_swap_rejects_an_unknown_unit(quantized_tiny):
    from bench.quant_swap import swapped_tensors

    base = load_weights(quantized_tiny("rtn-w4-g32-asym"))
    with pytest.raises(ValueError, match="unknown units \\['attention'\\]"):
        swapped_tensors(base, base, ["attention"], range(1))
