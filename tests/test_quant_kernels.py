"""Quantized-linear kernels against quant_linear_reference (x @ dequantize(W).T in float32) on
fresh random weights quantized by twinfer.quant (Triton's interpreter on CPU with small, ragged
shapes; Llama-8B shapes and bf16 with ``-m gpu``).

Tolerances are relative to the output's scale (max |ref|), since outputs are sums of K
products: fp32 1e-4 (summation order only); fp16 2e-3 and bf16 1.6e-2 (the dequantized weight
and the output are each rounded once to 11 or 8 bits of mantissa). W8A8 quantizes activations
as the reference does (on CUDA torch divides by 127 through a reciprocal, one ulp of the scale
apart), so it meets the same bounds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from twinfer.quant import QuantizedWeight, QuantScheme, quantize_activations_per_token, quantize_rtn
from twinfer_kernels.elementwise import rms_norm, silu_and_mul
from twinfer_kernels.quant_matmul import (
    KernelConfig,
    choose_config,
    prepare_quant_weight,
    quant_linear,
    quant_linear_reference,
    quantize_rows,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Triton 3.6's interpreter mishandles bfloat16, so bf16 is checked on the GPU only.
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
              DEVICE == "cpu", reason="Triton's CPU interpreter mishandles bfloat16"))]
# (bits, group_size, sym): every group size, both symmetries, both widths.
WEIGHT_ONLY = [(4, 32, False), (4, 64, True), (4, -1, False), (8, -1, True), (8, 32, False)]
W8A8 = QuantScheme(bits=8, group_size=-1, sym=True, act_bits=8)


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """Every torch.empty (outputs, split-K partials) starts as NaN / -1: unwritten shows."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", poisoned)


def random_quantized(n: int, k: int, scheme: QuantScheme, seed: int) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, : k // 8] *= 4  # uneven ranges: groups get different scales and zero points
    return quantize_rtn(w.to(DEVICE), scheme)


def random_x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(DEVICE, dtype)


def assert_close_to_reference(out, ref, dtype):
    tol = TOL[dtype] * ref.abs().max().item()
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,group_size,sym", WEIGHT_ONLY)
@pytest.mark.parametrize("m", [1, 3, 17, 33, 65, 129, 257])
def test_weight_only_linear_matches_reference(dtype, bits, group_size, sym, m):
    k, n = (192, 72) if m % 2 else (64, 48)
    qw = random_quantized(n, k, QuantScheme(bits, group_size, sym), seed=m + bits)
    x = random_x(m, k, dtype, seed=m)
    out = quant_linear(x, prepare_quant_weight(qw, dtype))
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close_to_reference(out, quant_linear_reference(x, qw), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 17, 33, 257])  # 257: the TMA kernel (prefill)
def test_w8a8_linear_matches_reference(dtype, m):
    qw = random_quantized(72, 192, W8A8, seed=m)
    x = random_x(m, 192, dtype, seed=m + 1)
    out = quant_linear(x, prepare_quant_weight(qw, dtype))
    assert_close_to_reference(out, quant_linear_reference(x, qw), dtype)


@pytest.mark.parametrize("config", [
    KernelConfig("gemv", 1, 16, 64, split_k=1),
    KernelConfig("gemv", 4, 32, 32, split_k=3),  # splits of 2, 2 and 2 K tiles
    KernelConfig("dot", 16, 32, 64, split_k=2),
    KernelConfig("dot", 32, 16, 32, split_k=1, group_m=2),
    KernelConfig("dot_tma", 16, 32, 64, split_k=2),
    KernelConfig("dequant", 1, 16, 64),
], ids=["gemv", "gemv-splitk", "dot-splitk", "dot-grouped", "dot-tma-splitk", "dequant"])
@pytest.mark.parametrize("bits,group_size,sym", [(4, 64, False), (8, -1, True)])
def test_every_kernel_path_matches_reference(config, bits, group_size, sym):
    qw = random_quantized(40, 192, QuantScheme(bits, group_size, sym), seed=7)
    x = random_x(5, 192, torch.float32, seed=8)
    out = quant_linear(x, prepare_quant_weight(qw, torch.float32), config=config)
    assert_close_to_reference(out, quant_linear_reference(x, qw), torch.float32)


def test_weight_only_dot_over_tma_falls_back_where_rows_are_not_16_byte_multiples():
    """K = 80 at 4 bits is 40 bytes a row: no TMA descriptor, so the plain loads run."""
    qw = random_quantized(24, 80, QuantScheme(4, 16, False), seed=11)
    x = random_x(3, 80, torch.float32, seed=12)
    out = quant_linear(x, prepare_quant_weight(qw, torch.float32),
                       config=KernelConfig("dot_tma", 16, 16, 16))
    assert_close_to_reference(out, quant_linear_reference(x, qw), torch.float32)


def test_weight_only_dot_over_tma_falls_back_where_a_groups_codes_are_under_16_bytes():
    """Groups of 16 cut the K tile to 16 codes, 8 bytes at 4 bits: below a TMA block's row."""
    qw = random_quantized(40, 192, QuantScheme(4, 16, False), seed=7)
    x = random_x(5, 192, torch.float32, seed=8)
    out = quant_linear(x, prepare_quant_weight(qw, torch.float32),
                       config=KernelConfig("dot_tma", 16, 32, 64, split_k=2))
    assert_close_to_reference(out, quant_linear_reference(x, qw), torch.float32)


def test_dot_tma_is_refused_for_w8a8_weights():
    w = prepare_quant_weight(random_quantized(32, 64, W8A8, seed=1), torch.float16)
    with pytest.raises(ValueError, match="dot_tma kernel is for weight-only"):
        quant_linear(random_x(2, 64, torch.float16, seed=2), w,
                     config=KernelConfig("dot_tma", 16, 32, 32))


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32, False), W8A8], ids=["w4", "w8a8"])
@pytest.mark.parametrize("kernel,split_k", [("dot", 1), ("dot", 3), ("dequant", 1)])
def test_bias_is_added_once(scheme, kernel, split_k):
    if kernel == "dequant" and scheme.act_bits == 8:
        pytest.skip("W8A8 has no dequantize path")
    qw = random_quantized(48, 192, scheme, seed=3)
    x = random_x(3, 192, torch.float16, seed=4)
    bias = torch.randn(48).to(DEVICE, torch.float16)
    config = KernelConfig(kernel, 16, 32, 32, split_k=split_k)
    out = quant_linear(x, prepare_quant_weight(qw, torch.float16), bias, config=config)
    assert_close_to_reference(out, quant_linear_reference(x, qw, bias), torch.float16)


@pytest.mark.parametrize("m,k,n", [(37, 192, 72), (16, 80, 40), (1, 64, 33)])
def test_w8a8_tma_kernel_matches_reference_at_ragged_edges(m, k, n):
    # Tiles of 16 x 32 x 64: rows, channels and K (80: 16-wide K tiles) end mid-tile, where
    # TMA fills zeros and the stores are masked.
    qw = random_quantized(n, k, W8A8, seed=m + n)
    x = random_x(m, k, torch.float16, seed=k)
    bias = torch.randn(n).to(DEVICE, torch.float16)
    out = quant_linear(x, prepare_quant_weight(qw, torch.float16), bias,
                       config=KernelConfig("tma", 16, 32, 64))
    assert_close_to_reference(out, quant_linear_reference(x, qw, bias), torch.float16)


@pytest.mark.parametrize("m", [3, 257])  # the pointer kernel; the TMA kernel
def test_w8a8_linear_takes_rows_already_quantized(m):
    qw = random_quantized(40, 64, W8A8, seed=m)
    w = prepare_quant_weight(qw, torch.float16)
    x = random_x(m, 64, torch.float16, seed=3)
    bias = torch.randn(40).to(DEVICE, torch.float16)
    out = quant_linear(quantize_rows(x), w, bias)
    assert out.dtype == torch.float16
    assert torch.equal(out, quant_linear(x, w, bias))


def test_int8_rows_are_refused_by_weight_only_weights():
    qw = random_quantized(40, 64, QuantScheme(8, -1, True), seed=1)
    x = quantize_rows(random_x(2, 64, torch.float16, seed=2))
    with pytest.raises(ValueError, match="int8 activations need a W8A8 weight"):
        quant_linear(x, prepare_quant_weight(qw, torch.float16))


def test_tma_kernel_is_refused_for_weight_only_weights():
    qw = random_quantized(48, 64, QuantScheme(4, 32, False), seed=1)
    with pytest.raises(ValueError, match="TMA kernel is for W8A8"):
        quant_linear(random_x(3, 64, torch.float16, seed=2),
                     prepare_quant_weight(qw, torch.float16), config=KernelConfig("tma", 16, 32, 64))


def test_quantize_rows_rounds_half_to_even_like_torch():
    x = random_x(6, 100, torch.float32, seed=5)
    x[2] = 0  # an all-zero row gets the minimum scale
    x[3] = x[3].clamp(-1, 1)
    x[3, 8] = 3.0
    half_step = torch.tensor(3.0) / 127 * 0.5  # exactly half a step: rounds to even (0)
    x[3, 7], x[3, 9] = half_step, -half_step
    q = quantize_rows(x)
    xq, scale = q.values, q.scales
    _, ref_scale = quantize_activations_per_token(x)
    # absmax / 127: torch on CUDA multiplies by the reciprocal, so allow one ulp.
    torch.testing.assert_close(scale, ref_scale[:, 0], rtol=2.4e-7, atol=0)
    ref_q = torch.clamp(torch.round(x / scale[:, None]), -127, 127).to(torch.int8)
    assert torch.equal(xq, ref_q) and xq[3, 7] == 0 and xq[3, 9] == 0


@pytest.mark.parametrize("bits,act_bits", [(4, 16), (8, 16), (8, 8)])
def test_prepared_weight_has_quantized_size(bits, act_bits):
    n, k = 48, 256
    scheme = QuantScheme(bits, -1 if act_bits == 8 else 128, act_bits == 8, act_bits)
    w = prepare_quant_weight(random_quantized(n, k, scheme, seed=1), torch.bfloat16)
    assert w.qweight.numel() * w.qweight.element_size() == n * k * bits // 8
    assert (w.in_features, w.out_features) == (k, n)
    groups = 1 if act_bits == 8 else k // 128
    scale_bytes = n * groups * (4 if act_bits == 8 else 2) * (1 if act_bits == 8 else 2)
    assert w.nbytes == n * k * bits // 8 + scale_bytes


def test_leading_dims_are_kept_and_empty_input_is_fine():
    qw = random_quantized(48, 64, QuantScheme(4, 32, False), seed=2)
    w = prepare_quant_weight(qw, torch.float32)
    x = random_x(6, 64, torch.float32, seed=3).view(2, 3, 64)
    out = quant_linear(x, w)
    assert out.shape == (2, 3, 48)
    assert_close_to_reference(out, quant_linear_reference(x, qw), torch.float32)
    assert quant_linear(x[:0], w).shape == (0, 3, 48)


def test_bad_inputs_raise_value_error():
    qw = random_quantized(48, 64, QuantScheme(4, 32, False), seed=2)
    w = prepare_quant_weight(qw, torch.float16)
    with pytest.raises(ValueError):
        quant_linear(random_x(2, 64, torch.float32, seed=0), w)  # dtype it was not prepared for
    with pytest.raises(ValueError):
        quant_linear(random_x(2, 32, torch.float16, seed=0), w)  # wrong K
    with pytest.raises(ValueError):
        quant_linear(random_x(2, 64, torch.float16, seed=0), w,
                     torch.zeros(47, dtype=torch.float16, device=DEVICE))
    act_order = QuantizedWeight(qw.codes, qw.scales, qw.zeros, 4, 32,
                                g_idx=torch.zeros(64, dtype=torch.int32))
    with pytest.raises(ValueError):
        prepare_quant_weight(act_order, torch.float16)
    asym8 = random_quantized(48, 64, QuantScheme(8, -1, False), seed=2)
    with pytest.raises(ValueError):  # W8A8 needs zeros == 128
        prepare_quant_weight(QuantizedWeight(asym8.codes, asym8.scales, asym8.zeros, 8, 64, 8),
                             torch.float16)


def test_one_fp16_row_on_cuda_picks_the_half2_gemv():
    w = prepare_quant_weight(random_quantized(48, 192, QuantScheme(4, 64, False), seed=1),
                             torch.float16)
    assert choose_config(1, 48, 192, w, num_sms=132, half2=True).kernel == "gemv_h2"
    assert choose_config(1, 48, 192, w, num_sms=132, half2=False).kernel == "gemv"
    assert choose_config(2, 48, 192, w, num_sms=132, half2=True).kernel == "dot"


def test_one_fp16_row_on_hopper_streams_the_large_4bit_projections_by_tma():
    w = prepare_quant_weight(random_quantized(48, 256, QuantScheme(4, 128, False), seed=1),
                             torch.float16)
    for n, k in [(28672, 4096), (4096, 14336)]:  # Llama-8B gate/up, down
        assert choose_config(1, n, k, w, num_sms=132, half2=True, tma=True).kernel == (
            "gemv_h2_tma")
        assert choose_config(1, n, k, w, num_sms=132, half2=True).kernel == "gemv_h2"
    assert choose_config(1, 4096, 4096, w, num_sms=132, half2=True, tma=True).kernel == (
        "gemv_h2")  # o_proj: TMA gained nothing there


def test_up_to_16_rows_on_hopper_stream_the_codes_by_tma():
    for bits in (4, 8):
        w = prepare_quant_weight(random_quantized(48, 256, QuantScheme(bits, 128, False), seed=1),
                                 torch.float16)
        for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
            assert choose_config(16, n, k, w, num_sms=132, half2=True, tma=True).kernel == (
                "dot_tma")
            assert choose_config(16, n, k, w, num_sms=132, half2=True).kernel == "dot"
            assert choose_config(17, n, k, w, num_sms=132, half2=True, tma=True).kernel == "dot"


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's refusal")
def test_half2_gemv_refuses_the_interpreter():
    qw = random_quantized(48, 192, QuantScheme(4, 64, False), seed=1)
    x = random_x(1, 192, torch.float16, seed=2)
    with pytest.raises(ValueError, match="half2 GEMV needs fp16 activations on CUDA"):
        quant_linear(x, prepare_quant_weight(qw, torch.float16),
                     config=KernelConfig("gemv_h2", 1, 32, 64))


# What a fused one-row GEMV absorbs (quant_linear's keyword arguments), by name.
FUSIONS = {"norm": ("norm",), "norm-gather": ("norm", "perm"), "silu": ("silu",),
           "silu-gather-residual": ("silu", "perm", "residual"), "residual": ("residual",),
           "norm-residual": ("norm", "residual")}


def fused_and_unfused(fusion: str, w, k: int, n: int, dtype: torch.dtype, config, seed: int,
                      pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """quant_linear with ``fusion`` fused in, and the kernel sequence it replaces: rms_norm or
    silu_and_mul, the act-order gather, the GEMV, then the residual add rounded as the
    unfused forward pass rounds it."""
    parts = FUSIONS[fusion]
    g = torch.Generator().manual_seed(seed)
    x = random_x(1, 2 * k if "silu" in parts else k, dtype, seed)
    norm_w = (1 + 0.1 * torch.randn(k, generator=g)).to(DEVICE, dtype)
    perm = torch.randperm(k, generator=g).to(DEVICE)
    residual = torch.randn(1, n, generator=g).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype)
    fused = quant_linear(x, w, bias, config, norm_weight=norm_w if "norm" in parts else None,
                         eps=1e-5, silu="silu" in parts,
                         input_perm=perm if "perm" in parts else None,
                         residual=residual if "residual" in parts else None, pdl=pdl)
    h = rms_norm(x, norm_w, 1e-5)[0] if "norm" in parts else x
    h = silu_and_mul(h) if "silu" in parts else h
    h = h[:, perm].contiguous() if "perm" in parts else h
    y = quant_linear(h, w, bias, config)
    if "residual" in parts:
        y = (y.float() + residual.float()).to(dtype)
    return fused, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("split_k", [1, 3])
def test_one_row_gemv_fusions_equal_the_unfused_kernels(dtype, fusion, split_k):
    """Norm / SiLU-and-mul / act-order gather / residual fused into the float32 GEMV give what
    the separate kernels give (up to rstd's summation order), with and without split-K."""
    k, n = 192, 40
    w = prepare_quant_weight(random_quantized(n, k, QuantScheme(4, 64, False), seed=3), dtype)
    config = KernelConfig("gemv", 1, 16, 64, split_k=split_k)
    fused, ref = fused_and_unfused(fusion, w, k, n, dtype, config, seed=split_k)
    assert_close_to_reference(fused, ref.float(), dtype)


def test_fusions_are_refused_where_no_one_row_gemv_runs():
    w = prepare_quant_weight(random_quantized(48, 64, QuantScheme(4, 32, False), seed=2),
                             torch.float32)
    x = random_x(2, 64, torch.float32, seed=0)
    with pytest.raises(ValueError, match="one-row weight-only GEMV"):
        quant_linear(x, w, residual=torch.zeros(2, 48, device=DEVICE))
    with pytest.raises(ValueError, match="either an RMSNorm or a SiLU"):
        quant_linear(random_x(1, 128, torch.float32, seed=0), w, silu=True,
                     norm_weight=torch.ones(64, device=DEVICE))
    with pytest.raises(ValueError, match="fuse only into the one-row GEMV"):
        quant_linear(x[:1], w, None, KernelConfig("dot", 16, 32, 32), norm_weight=torch.ones(
            64, device=DEVICE))
    with pytest.raises(ValueError, match="input_perm must be"):
        quant_linear(x[:1], w, input_perm=torch.arange(63, device=DEVICE))


LLAMA_SHAPES = [(4096, 6144), (14336, 4096)]  # (K, N): fused qkv, down_proj
GPU_SCHEMES = {"w4a16-g128": QuantScheme(4, 128, False), "w8a16": QuantScheme(8, -1, True),
               "w8a8": W8A8}


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scheme", list(GPU_SCHEMES))
@pytest.mark.parametrize("m", [1, 5, 16, 64, 256, 2048])
@pytest.mark.parametrize("k,n", LLAMA_SHAPES)
def test_llama_shapes_match_reference_on_gpu(dtype, scheme, m, k, n):
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is fp32 matmul
    qw = random_quantized(n, k, GPU_SCHEMES[scheme], seed=m)
    x = random_x(m, k, dtype, seed=k)
    bias = torch.randn(n).to(DEVICE, dtype)
    out = quant_linear(x, prepare_quant_weight(qw, dtype), bias)
    assert_close_to_reference(out, quant_linear_reference(x, qw, bias), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="needs CUDA (inline PTX)")
@pytest.mark.parametrize("bits,group_size,sym", WEIGHT_ONLY)
@pytest.mark.parametrize("k,n,block_n,split_k", [(192, 72, 32, 1), (192, 72, 64, 3),
                                                 (4096, 6144, 64, 8), (14336, 4096, 128, 4)])
@pytest.mark.parametrize("kernel", ["gemv_h2", "gemv_h2_tma"])
def test_half2_gemv_matches_reference_on_gpu(bits, group_size, sym, k, n, block_n, split_k,
                                             kernel):
    qw = random_quantized(n, k, QuantScheme(bits, group_size, sym), seed=k + bits)
    x = random_x(1, k, torch.float16, seed=n)
    bias = torch.randn(n).to(DEVICE, torch.float16)
    config = KernelConfig(kernel, 1, block_n, 256, split_k=split_k)
    out = quant_linear(x, prepare_quant_weight(qw, torch.float16), bias, config=config)
    assert_close_to_reference(out, quant_linear_reference(x, qw, bias), torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="needs CUDA")
@pytest.mark.parametrize("m,bits", [(16, 4), (5, 8)])
def test_weight_only_dot_over_tma_is_deterministic_on_gpu(m, bits):
    """Its codes by TMA, x by plain loads: with x by TMA as well, some tiles raced."""
    qw = random_quantized(4096, 4096, QuantScheme(bits, 128, False), seed=m)
    w = prepare_quant_weight(qw, torch.float16)
    x = random_x(m, 4096, torch.float16, seed=bits)
    config = KernelConfig("dot_tma", 16, 64, 128, split_k=2, num_stages=4)
    first = quant_linear(x, w, config=config)
    assert_close_to_reference(first, quant_linear_reference(x, qw), torch.float16)
    for _ in range(50):
        assert torch.equal(quant_linear(x, w, config=config), first)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="needs CUDA (inline PTX)")
def test_half2_gemv_over_tma_falls_back_where_a_group_is_under_16_bytes():
    """4-bit groups of 16 are 8 bytes per row: no TMA box can hold one, so the plain half2
    GEMV runs instead of an error."""
    qw = random_quantized(96, 256, QuantScheme(4, 16, False), seed=3)
    x = random_x(1, 256, torch.float16, seed=4)
    out = quant_linear(x, prepare_quant_weight(qw, torch.float16),
                       config=KernelConfig("gemv_h2_tma", 1, 32, 256, split_k=2))
    assert_close_to_reference(out, quant_linear_reference(x, qw), torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="needs CUDA (inline PTX)")
@pytest.mark.parametrize("in_kernel", [True, False], ids=["last-program-sums", "sum-kernel"])
@pytest.mark.parametrize("kernel", ["gemv_h2", "gemv_h2_tma"])
def test_half2_gemv_split_k_is_deterministic_and_leaves_counters_at_zero(in_kernel, kernel):
    w = prepare_quant_weight(random_quantized(4096, 4096, QuantScheme(4, 128, False), seed=9),
                             torch.float16)
    if not in_kernel:
        w = dataclasses.replace(w, split_counters=None)
    x = random_x(1, 4096, torch.float16, seed=10)
    config = KernelConfig(kernel, 1, 32, 256, split_k=16)
    first = quant_linear(x, w, config=config)
    for _ in range(20):
        assert torch.equal(quant_linear(x, w, config=config), first)
    assert w.split_counters is None or int(w.split_counters.abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="needs CUDA (inline PTX)")
@pytest.mark.parametrize("bits", [4, 8])
def test_half2_gemv_does_not_overflow_on_fp16_extremes(bits):
    """Half2 lanes hold partial sums in fp16; x is pre-scaled so even |x| = 65504 fits."""
    qw = random_quantized(64, 1024, QuantScheme(bits, 128, False), seed=5)
    x = (random_x(1, 1024, torch.float32, seed=6) * 4000).clamp(-65504, 65504)
    x[0, ::97] = 65504.0  # lanes of a word see several of these at most once per 97 codes
    x[0, 1::194] = -65504.0
    x = x.to(torch.float16)
    out = quant_linear(x, prepare_quant_weight(qw, torch.float16),
                       config=KernelConfig("gemv_h2", 1, 32, 128))
    ref = quant_linear_reference(x, qw)
    in_range = ref.abs() < 60000  # larger outputs round to inf in fp16 either way
    assert in_range.float().mean() > 0.9
    assert torch.isfinite(out[in_range]).all()
    assert_close_to_reference(out[in_range], ref[in_range], torch.float16)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="needs CUDA (inline PTX)")
@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k,n,split_k", [(4096, 6144, 8), (14336, 4096, 1), (4096, 4096, 16)])
@pytest.mark.parametrize("kernel", ["gemv_h2", "gemv_h2_tma"])
def test_half2_gemv_fusions_equal_the_unfused_kernels_on_gpu(fusion, bits, k, n, split_k,
                                                             kernel):
    """The half2 GEMV's fused prologue (pairs built in registers) and residual epilogue, at
    Llama-8B shapes, launched as programmatic dependent launches on Hopper."""
    qw = random_quantized(n, k, QuantScheme(bits, 128, False), seed=k + bits)
    w = prepare_quant_weight(qw, torch.float16)
    config = KernelConfig(kernel, 1, 64, 256, split_k=split_k)
    pdl = torch.cuda.get_device_capability()[0] >= 9
    fused, ref = fused_and_unfused(fusion, w, k, n, torch.float16, config, seed=n, pdl=pdl)
    assert_close_to_reference(fused, ref.float(), torch.float16)
