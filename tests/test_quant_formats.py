"""Quantization parameters and checkpoint packings: error bounds and exact round trips.

The packing tests compare against loops written the way AutoGPTQ's ``QuantLinear.pack`` and
AutoAWQ's ``WQLinear_GEMM.from_linear`` write them, so a twinfer checkpoint has the bit layout
other tools expect.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twinfer.quant import QuantizedWeight, QuantScheme, quantize_activations_per_token, quantize_rtn
from twinfer.quant_formats import (
    pack_awq,
    pack_gptq,
    pack_int8_channel,
    read_quantized_linear,
    unpack_awq,
    unpack_gptq,
)


def random_weight(n=64, k=128, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, 64, True), (8, -1, True),
                                            (8, 32, False), (4, -1, False)])
def test_rtn_error_is_at_most_half_a_step(bits, group, sym):
    w = random_weight()
    qw = quantize_rtn(w, QuantScheme(bits, group, sym))
    gs = qw.group_size
    step = qw.scales.repeat_interleave(gs, dim=1)
    err = (qw.dequantize() - w).abs()
    # Half a step, plus the fp16 rounding of the scale itself times the largest code distance.
    assert bool((err <= step / 2 * (1 + 1e-3) + step * 2 ** -11 * 2 ** bits).all())
    assert int(qw.codes.max()) < 2 ** bits


def test_symmetric_rtn_maps_zero_to_zero():
    w = random_weight()
    w[:, :7] = 0
    qw = quantize_rtn(w, QuantScheme(4, 32, sym=True))
    assert bool((qw.zeros == 8).all())
    assert torch.equal(qw.dequantize()[:, :7], torch.zeros(64, 7))


def test_group_size_that_does_not_divide_names_the_layer():
    with pytest.raises(ValueError, match="model.layers.3.mlp.down_proj.*576.*128"):
        quantize_rtn(torch.zeros(8, 576), QuantScheme(4, 128), "model.layers.3.mlp.down_proj")


def test_w8a8_requires_symmetric_per_channel_int8():
    with pytest.raises(ValueError, match="8-bit activations"):
        QuantScheme(4, 128, False, act_bits=8)


def test_activation_quantization_error_is_at_most_half_a_step():
    x = torch.randn(5, 64) * torch.tensor([1.0, 10.0, 0.1, 3.0, 100.0])[:, None]
    x_q, scale = quantize_activations_per_token(x)
    assert x_q.dtype == torch.int8
    assert bool(((x_q.float() * scale - x).abs() <= scale / 2 + 1e-6).all())


def autogptq_pack(codes_kn: np.ndarray, zeros_gn: np.ndarray, bits: int):
    """AutoGPTQ QuantLinear.pack's loops (intweight [K, N], zeros [G, N])."""
    intweight = codes_kn.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + (32 // bits)):
            qweight[row] |= intweight[j] << (bits * (j - i))
        i += 32 // bits
        row += 1
    zeros = (zeros_gn.astype(np.uint32) - 1) & (2 ** bits - 1)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 32 * bits), dtype=np.uint32)
    i = col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + (32 // bits)):
            qzeros[:, col] |= zeros[:, j] << (bits * (j - i))
        i += 32 // bits
        col += 1
    return qweight.view(np.int32), qzeros.view(np.int32)


def autoawq_pack(values_rn: np.ndarray):
    """AutoAWQ WQLinear_GEMM.from_linear's loop for 4 bits ([R, N] -> [R, N / 8])."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    v = values_rn.astype(np.uint32)
    packed = np.zeros((v.shape[0], v.shape[1] // 8), dtype=np.uint32)
    for col in range(v.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= v[:, col * 8 + order_map[i]] << (i * 4)
    return packed.view(np.int32)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_packing_matches_autogptq_bit_layout(bits):
    qw = quantize_rtn(random_weight(), QuantScheme(bits, 32, sym=False))
    packed = pack_gptq(qw)
    ref_w, ref_z = autogptq_pack(qw.codes.t().numpy(), qw.zeros.t().numpy(), bits)
    np.testing.assert_array_equal(packed["qweight"].numpy(), ref_w)
    np.testing.assert_array_equal(packed["qzeros"].numpy(), ref_z)
    assert packed["scales"].dtype == torch.float16 and packed["scales"].shape == (4, 64)


def test_awq_packing_matches_autoawq_bit_layout():
    qw = quantize_rtn(random_weight(), QuantScheme(4, 32, sym=False))
    packed = pack_awq(qw)
    np.testing.assert_array_equal(packed["qweight"].numpy(), autoawq_pack(qw.codes.t().numpy()))
    np.testing.assert_array_equal(packed["qzeros"].numpy(), autoawq_pack(qw.zeros.t().numpy()))


def assert_same_weight(a: QuantizedWeight, b: QuantizedWeight):
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.zeros, b.zeros)
    assert torch.equal(a.scales, b.scales)
    assert torch.equal(a.dequantize(), b.dequantize())


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, 128, True), (8, -1, True),
                                            (8, 64, False)])
def test_gptq_round_trip_is_exact(bits, group, sym):
    qw = quantize_rtn(random_weight(), QuantScheme(bits, group, sym))
    assert_same_weight(unpack_gptq(pack_gptq(qw), bits, "x"), qw)


def test_gptq_round_trip_keeps_act_order_group_index():
    qw = quantize_rtn(random_weight(), QuantScheme(4, 32, sym=True))
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(1))
    qw.g_idx = (torch.argsort(perm) // 32).to(torch.int32)
    back = unpack_gptq(pack_gptq(qw), 4, "x")
    assert torch.equal(back.g_idx, qw.g_idx)
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_gptq_asymmetric_zero_point_of_zero_survives_the_minus_one_quirk():
    qw = quantize_rtn(random_weight().abs(), QuantScheme(4, 32, sym=False))  # min 0: zero 0
    assert int(qw.zeros.min()) == 0
    assert_same_weight(unpack_gptq(pack_gptq(qw), 4, "x"), qw)


def test_awq_round_trip_is_exact():
    qw = quantize_rtn(random_weight(), QuantScheme(4, 64, sym=False))
    assert_same_weight(unpack_awq(pack_awq(qw), "x"), qw)


def test_int8_channel_round_trip_is_exact():
    qw = quantize_rtn(random_weight(), QuantScheme(8, -1, True, act_bits=8))
    tensors = {f"l.{k}": v for k, v in pack_int8_channel(qw).items()}
    config = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "input_activations": {"num_bits": 8}}}}
    back = read_quantized_linear(tensors, "l", config)
    assert back.act_bits == 8
    assert_same_weight(back, qw)


def test_awq_rejects_act_order_weights():
    qw = quantize_rtn(random_weight(), QuantScheme(4, 32))
    qw.g_idx = torch.zeros(128, dtype=torch.int32)
    with pytest.raises(ValueError, match="act-order"):
        pack_awq(qw)


def test_unknown_quant_method_is_named():
    with pytest.raises(ValueError, match="'exl2'"):
        read_quantized_linear({}, "l", {"quant_method": "exl2"})
