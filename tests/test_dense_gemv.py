"""twinfer_kernels/dense_gemv.py against x @ W.T in float32 on fresh random inputs (Triton's interpreter
on CPU with small, ragged shapes; Llama-8B shapes with ``-m gpu``). Tolerance: fp16 outputs
are rounded once (11-bit mantissa) after a float32 sum, so 2e-3 of max |ref|; bf16 1.6e-2."""

from __future__ import annotations

import pytest
import torch

from twinfer_kernels.dense_gemv import dense_gemv
from twinfer_kernels.elementwise import rms_norm, silu_and_mul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def check(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, **config) -> None:
    g = torch.Generator().manual_seed(n * 7 + k)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) * 0.05).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    out = dense_gemv(x, w, b, **config)
    ref = x.float() @ w.float().T + (b.float() if bias else 0)
    assert out.shape == (m, n) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=TOL[dtype] * ref.abs().max().item())


@pytest.mark.parametrize("n,k", [(48, 64), (37, 200), (1, 17), (130, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_gemv_matches_matmul_on_ragged_shapes(n, k, dtype):
    check(1, n, k, dtype, bias=False, block_n=16, block_k=64)


def test_dense_gemv_adds_bias_once_and_handles_several_rows():
    check(3, 40, 96, torch.float32, bias=True, block_n=16, block_k=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_gemv_with_norm_and_residual_equals_the_unfused_kernels(dtype):
    """GEMV(RMSNorm(x) * g) + residual == rms_norm, then GEMV, then the residual add, as the
    unfused forward pass computes them (rounding included: up to rstd's summation order)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 200, generator=g).to(DEVICE, dtype)
    w = (torch.randn(37, 200, generator=g) * 0.05).to(DEVICE, dtype)
    norm_w = (1 + 0.1 * torch.randn(200, generator=g)).to(DEVICE, dtype)
    residual = torch.randn(2, 37, generator=g).to(DEVICE, dtype)
    out = dense_gemv(x, w, None, 16, 64, norm_weight=norm_w, eps=1e-5, residual=residual)
    y = dense_gemv(rms_norm(x, norm_w, 1e-5)[0], w, None, 16, 64)
    ref = (y.float() + residual.float()).to(dtype)
    torch.testing.assert_close(out, ref, atol=TOL[dtype] * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_gemv_with_silu_equals_silu_and_mul_then_gemv(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2 * 130, generator=g).to(DEVICE, dtype)  # [gate | up]
    w = (torch.randn(48, 130, generator=g) * 0.05).to(DEVICE, dtype)
    out = dense_gemv(x, w, None, 16, 64, silu=True)
    torch.testing.assert_close(out, dense_gemv(silu_and_mul(x), w, None, 16, 64), atol=0, rtol=0)


def test_dense_gemv_rejects_norm_and_silu_together():
    with pytest.raises(ValueError, match="either an RMSNorm or a SiLU"):
        dense_gemv(torch.zeros(1, 16, device=DEVICE), torch.zeros(4, 8, device=DEVICE),
                   norm_weight=torch.ones(8, device=DEVICE), silu=True)


def test_dense_gemv_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="dense_gemv wants x"):
        dense_gemv(torch.zeros(1, 8, device=DEVICE), torch.zeros(4, 9, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (4096, 14336), (28672, 4096)])
def test_dense_gemv_matches_matmul_at_llama_shapes_on_gpu(n, k, dtype):
    check(1, n, k, dtype, bias=True)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_gemv_fusions_at_llama_shapes_on_gpu(dtype):
    """qkv with the input norm fused, down with SiLU-and-mul and the residual fused."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(1, 4096, generator=g).to(DEVICE, dtype)
    norm_w = (1 + 0.1 * torch.randn(4096, generator=g)).to(DEVICE, dtype)
    w_qkv = (torch.randn(6144, 4096, generator=g) * 0.02).to(DEVICE, dtype)
    out = dense_gemv(h, w_qkv, norm_weight=norm_w, eps=1e-5)
    ref = rms_norm(h, norm_w, 1e-5)[0].float() @ w_qkv.float().T
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=TOL[dtype] * ref.abs().max().item())
    gate_up = torch.randn(1, 2 * 14336, generator=g).to(DEVICE, dtype)
    w_down = (torch.randn(4096, 14336, generator=g) * 0.02).to(DEVICE, dtype)
    out = dense_gemv(gate_up, w_down, silu=True, residual=h)
    ref = silu_and_mul(gate_up).float() @ w_down.float().T + h.float()
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=TOL[dtype] * ref.abs().max().item())
