"""Quantized linears: y = x @ W.T (+ bias) with W held as 4- or 8-bit codes.

Load time (``prepare_quant_weight``) repacks a ``twinfer.quant.QuantizedWeight``: 4-bit codes
two per byte along K, low nibble first (read as int32, the same bytes hold eight codes in
order), 8-bit codes one per byte, scales and zeros [N, G] in fp16 (fp32 for fp32 activations);
W8A8 weights as signed int8 with one float32 scale per channel. Run time (``quant_linear``)
picks a kernel by M, the rows of x, with thresholds from H100 sweeps (``choose_config``):

* weight-only, M <= GEMV_MAX_M: a GEMV on the CUDA cores, split-K. For fp16 on CUDA,
  ``gemv_half2_kernel`` (half2_gemv.py: packed half2 math in inline PTX, two codes per LOP3
  and HFMA2); otherwise ``_gemv_kernel`` in float32, where a code becomes a float by being
  OR-ed into the mantissa of 2**23 (one LOP3 and one FADD; I2F is quarter rate). Both can
  take an RMSNorm or SiLU-and-mul on their input, an act-order gather and the residual add
  (batch-1 decode; gemv_fusion.py) and launch as programmatic dependent launches.
* weight-only up to DENSE_MIN_M rows, and W8A8 at any M: ``_dot_kernel`` / ``_int8_dot_kernel``
  on the tensor cores. They compute out.T = W @ x.T, so the weight tile dequantized in
  registers (fp16 0x6400 | q is 1024 + q, exactly) is wgmma's register operand and small M only
  pads the dot's N side; split-K for small M. Per-channel weights dot the exact integers
  (q - z) and scale the accumulator.
* weight-only above DENSE_MIN_M rows: ``_dequantize_kernel`` writes a transient dense weight
  (N*K*2 bytes) and cuBLAS multiplies. Dequantizing inside a Triton GEMM left the tensor cores
  waiting on the unpacking: 0.5-0.65x fp16 at M=2048, against 0.82-0.88x this way.
* W8A8 activations: ``_quantize_rows_kernel``, per-row absmax int8 exactly as
  ``quantize_activations_per_token``; the int8 x int8 -> int32 dot applies row x channel
  scales in its epilogue. Above 256 rows (prefill) on Hopper, ``_int8_tma_kernel`` loads both
  tiles by TMA (1.1-1.3x faster than pointer loads at 2,048 rows, H200).

Invariants: BLOCK_K divides the group size (so a K tile lies in one group) and K; split
boundaries fall on BLOCK_K; out-of-range rows and channels are clamped on load (recomputing a
valid one) and masked on store. Split-K programs write float32 partials [SPLIT, M, N] that
``_sum_splits_kernel`` adds (with the bias) into the output, so results are deterministic; the
half2 GEMV adds its own, in its last program per tile (``split_counters``), in split order.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from twinfer.quant import QuantizedWeight, quantize_activations_per_token
from twinfer_kernels.gemv_fusion import add_residual, gathered_input, row_rstd
from twinfer_kernels.half2_gemv import gemv_half2_kernel
from twinfer_kernels.int8_activations import QuantizedActivation, quantize_row
from twinfer_kernels.pdl import launch_options

GEMV_MAX_M = 1  # M=2..4 already run faster on the tensor cores (H100 sweep)
DENSE_MIN_M = 256  # weight-only: above this many rows, dequantize once and use cuBLAS
_HALF2 = ("gemv_h2", "gemv_h2_tma")  # the half2 GEMV's kernel names


@dataclass(frozen=True)
class PreparedQuantWeight:
    """A quantized linear in the kernels' layout (see ``prepare_quant_weight``)."""

    # 4-bit: uint8 [N, K/2], byte j = q[2j] | q[2j+1] << 4; 8-bit: uint8 [N, K] codes;
    # W8A8: int8 [N, K] = q - 128
    qweight: torch.Tensor
    scales: torch.Tensor  # [N, G]: fp16 (fp32 for fp32 activations); W8A8: float32 [N]
    zeros: torch.Tensor | None  # [N, G] like scales; None for W8A8 (symmetric)
    bits: int
    group_size: int
    act_bits: int
    dtype: torch.dtype  # the activation dtype this was prepared for
    # One int32 per GEMV output tile (N / 16 of them, zero between calls): split-K programs of
    # the half2 GEMV count themselves in, and the last one of a tile adds the partials.
    split_counters: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * (2 if self.bits == 4 else 1)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros)
                   if t is not None)


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters; ``quant_linear`` picks one unless given."""

    # "gemv" (weight-only, M=1, float32 math), "gemv_h2" (the same in half2 math: fp16 on
    # CUDA, twinfer_kernels/half2_gemv.py), "gemv_h2_tma" (the half2 GEMV with its codes
    # streamed by TMA through num_stages buffers: Hopper; "gemv_h2" elsewhere), "dot", "tma"
    # (W8A8 with TMA loads: Hopper, the interpreter; "dot" elsewhere), "dot_tma"
    # (weight-only "dot" with its codes by TMA: the same devices), or "dequant"
    # (weight-only, then cuBLAS)
    kernel: str
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8


def prepare_quant_weight(qw: QuantizedWeight, dtype: torch.dtype) -> PreparedQuantWeight:
    """Repack ``qw`` (canonical layout, g_idx already applied by the caller) for activations of
    ``dtype``. Memory is the quantized size: K*N/2 (4-bit) or K*N bytes plus scales/zeros."""
    N, K = qw.codes.shape
    gs = qw.group_size
    if qw.g_idx is not None:
        raise ValueError("permute act-order weights (g_idx) into group order before prepare")
    if qw.bits not in (4, 8) or dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"need 4/8-bit codes and fp16/bf16/fp32 activations, got bits "
                         f"{qw.bits}, {dtype}")
    if K % gs or gs % 16 or qw.scales.shape != (N, K // gs):
        raise ValueError(f"group size {gs} must be a multiple of 16 dividing K={K}, with scales "
                         f"[N, K/group]; got scales {tuple(qw.scales.shape)}")
    if qw.act_bits == 8:
        if qw.bits != 8 or gs != K or bool((qw.zeros != 128).any()):
            raise ValueError("W8A8 needs symmetric per-channel 8-bit weights (zeros == 128)")
        qweight = (qw.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        return PreparedQuantWeight(qweight, qw.scales[:, 0].float().contiguous(), None, 8, K, 8,
                                   dtype)
    # fp16 holds checkpoint scales exactly; bf16 activations dequantize in fp16, then round.
    sdtype = torch.float32 if dtype == torch.float32 else torch.float16
    if qw.bits == 4:
        codes = qw.codes.view(N, K // 2, 2)
        qweight = (codes[..., 0] | (codes[..., 1] << 4)).contiguous()
    else:
        qweight = qw.codes.contiguous()
    counters = torch.zeros(triton.cdiv(N, 16), dtype=torch.int32, device=qweight.device)
    return PreparedQuantWeight(qweight, qw.scales.to(sdtype).contiguous(),
                               qw.zeros.to(sdtype).contiguous(), qw.bits, gs, 16, dtype,
                               counters)


@triton.jit
def _load_codes(qw_ptr, rows, k0, stride_qn, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] integer codes of weight rows ``rows``, columns k0 .. k0 + BLOCK_K."""
    cols = k0 * BITS // 8 + tl.arange(0, BLOCK_K * BITS // 8)
    return _unpack_codes(tl.load(qw_ptr + rows[:, None] * stride_qn + cols[None, :]), BITS)


@triton.jit
def _unpack_codes(packed, BITS: tl.constexpr):
    """Codes from prepare_quant_weight's bytes: two per byte for 4-bit, even k in the low
    nibble."""
    if BITS == 4:  # one return: Triton wants one type from every return statement
        codes = tl.interleave(packed & 0xF, packed >> 4)
    else:
        codes = packed
    return codes


@triton.jit
def _minus_zero(q, z, FP16_MATH: tl.constexpr):
    """q [BN, BK] - z [BN] as exact integers in z's dtype."""
    if FP16_MATH:  # 0x6400 | q is the fp16 1024 + q: exact, and no slow I2F
        w = (q.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + z[:, None])
    else:
        w = q.to(z.dtype) - z[:, None]
    return w


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row tiles sweep the columns together, so weight tiles stay in L2."""
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % width) % size, (pid % width) // size


@triton.jit
def _program_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The split-K dot kernels' program: its output rows and columns, the same wrapped in
    bounds for loads (x rows, weight rows), its K split and its first weight row."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m % M, offs_n % N, tl.program_id(1), pid_n * BLOCK_N


@triton.jit
def _store_tile(out_ptr, acc_t, bias_ptr, offs_m, offs_n, M, N, stride_om, HAS_BIAS: tl.constexpr):
    """out[m, n] = acc_t[n, m] (+ bias[n]); the dot kernels accumulate out.T."""
    if HAS_BIAS:
        acc_t += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None],
             acc_t.to(out_ptr.dtype.element_ty), mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))


@triton.jit
def _add_code_products(part, words, z, x, magic, BITS: tl.constexpr, SHIFT: tl.constexpr):
    """part [BN, WORDS] += (q - z) * x for the code at bits SHIFT of every word. The code, kept
    in place (so scaled by 2**SHIFT), is OR-ed into the mantissa of 2**23: one LOP3 and one
    FADD give the exact float (q - z) 2**SHIFT (I2F is quarter rate); x is scaled back."""
    q = (words & ((2 ** BITS - 1) << SHIFT)) | magic
    w = q.to(tl.float32, bitcast=True) - (8388608.0 + z * (1 << SHIFT))[:, None]
    return part + w * (x.to(tl.float32) * (1.0 / (1 << SHIFT)))[None, :]


@triton.jit
def _gemv_kernel(
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, norm_w_ptr, perm_ptr, residual_ptr, out_ptr,
    M, N, K, k_per_split, eps, stride_xm, stride_qn, stride_sn, stride_rm, stride_om, stride_os,
    magic, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr, SILU: tl.constexpr, PERM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    K_POW2: tl.constexpr, PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # qw_ptr is the packed weight viewed as int32 [N, K / PER_WORD] (little-endian: code
    # k = PER_WORD * j + t sits at bits BITS * t of word j); stride_qn counts words. ``magic``
    # is 0x4B000000 (2**23) passed as an argument: as a register operand ptxas folds the mask
    # and the OR into one LOP3, where two immediates take two. NORM / SILU / PERM /
    # HAS_RESIDUAL / PDL: the fusions and launch of dense_gemv (gemv_fusion.py); HAS_RESIDUAL
    # only with one split (otherwise _sum_splits_kernel adds the residual).
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    IN_PLACE: tl.constexpr = 23 // BITS  # codes that fit below bit 23 of their word
    row, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, WORDS)
    w_ptrs = qw_ptr + (offs_n % N)[:, None] * stride_qn + cols[None, :]
    k_lo = split * k_per_split
    # Accumulates [BN, WORDS] partial sums and reduces across WORDS once, after the loop: a
    # reduction per K tile costs cross-lane shuffles every iteration.
    acc2 = tl.zeros([BLOCK_N, WORDS], tl.float32)
    kw_end = tl.minimum(k_lo + k_per_split, K) // PER_WORD
    words_next = tl.load(w_ptrs + k_lo // PER_WORD)  # [BN, WORDS] int32
    if PDL:  # the first weight tile depends on no earlier kernel; x does
        gdc_wait()
    x_row = x_ptr + row * stride_xm
    rstd = 1.0
    if NORM:
        rstd = row_rstd(x_row, K, eps, K_POW2)
    dtype = x_ptr.dtype.element_ty
    for kw in range(k_lo // PER_WORD, kw_end, WORDS):
        kw = tl.multiple_of(kw, WORDS)
        words = words_next  # and the next tile's load goes out before this one is used
        words_next = tl.load(w_ptrs + kw + WORDS, mask=kw + WORDS < kw_end, other=0)
        k0 = kw * PER_WORD
        g = k0 // GROUP_SIZE
        z = tl.load(zeros_ptr + (offs_n % N) * stride_sn + g).to(tl.float32)
        s = tl.load(scales_ptr + (offs_n % N) * stride_sn + g).to(tl.float32)
        x_cols = k0 + cols * PER_WORD
        part = tl.zeros([BLOCK_N, WORDS], tl.float32)
        for t in tl.static_range(PER_WORD):  # one code of every word at a time
            x = gathered_input(x_row, norm_w_ptr, perm_ptr, x_cols + t, K, rstd, NORM, SILU,
                               PERM, dtype)
            if t < IN_PLACE:
                part = _add_code_products(part, words, z, x, magic, BITS, BITS * t)
            else:  # codes above bit 23: shift down first
                part = _add_code_products(part, words >> 16, z, x, magic, BITS, BITS * t - 16)
        acc2 += part * s[:, None]
    if PDL:
        gdc_launch_dependents()
    acc = tl.sum(acc2, axis=1)
    out_ptr += split * stride_os + row * stride_om
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    y = add_residual(acc, residual_ptr + row * stride_rm + offs_n, offs_n < N, HAS_RESIDUAL,
                     out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_n, y, mask=offs_n < N)


@triton.jit
def _dot_kernel(
    x_ptr, qw_ptr, qw_desc, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
    M, N, K, k_per_split, stride_xm, stride_qn, stride_sn, stride_om, stride_os,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr,
    FP16_MATH: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Computes out.T = W @ x.T: the weight tile dequantized in registers is the dot's first
    # operand, which the tensor cores (wgmma) read straight from registers; x comes through
    # shared memory. Small M then only pads the dot's N side (>= 16). TMA: the packed codes
    # come through qw_desc (blocks [BLOCK_N, BLOCK_K * BITS / 8] bytes); x keeps plain loads
    # (with x by TMA too, some tiles gave nondeterministic results: RESULTS.md).
    offs_m, offs_n, xrows, rows, split, n0 = _program_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = split * k_per_split
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    if SCALE_AFTER_DOT:  # one group per row: dot the exact integers (q - z), scale at the end
        z = tl.load(zeros_ptr + rows * stride_sn)
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        k0 = tl.multiple_of(k0, BLOCK_K)
        a = tl.load(x_ptr + xrows[:, None] * stride_xm + (k0 + offs_k)[None, :])  # [BM, BK]
        if TMA:
            q = _unpack_codes(qw_desc.load([n0, k0 * BITS // 8]), BITS)
        else:
            q = _load_codes(qw_ptr, rows, k0, stride_qn, BITS, BLOCK_K)  # [BN, BK]
        if not SCALE_AFTER_DOT:
            g = k0 // GROUP_SIZE
            z = tl.load(zeros_ptr + rows * stride_sn + g)
        w = _minus_zero(q, z, FP16_MATH)
        if not SCALE_AFTER_DOT:
            w *= tl.load(scales_ptr + rows * stride_sn + g)[:, None]
        acc = tl.dot(w.to(a.dtype), tl.trans(a), acc, input_precision=PRECISION)
    if SCALE_AFTER_DOT:
        acc *= tl.load(scales_ptr + rows * stride_sn).to(tl.float32)[:, None]
    _store_tile(out_ptr + split * stride_os, acc, bias_ptr, offs_m, offs_n, M, N, stride_om,
                HAS_BIAS)


@triton.jit
def _dequantize_kernel(qw_ptr, scales_ptr, zeros_ptr, out_ptr, N, stride_qn, stride_sn, stride_on,
                       BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, FP16_MATH: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    rows = offs_n % N
    q = _load_codes(qw_ptr, rows, k0, stride_qn, BITS, BLOCK_K)
    g = k0 // GROUP_SIZE
    w = _minus_zero(q, tl.load(zeros_ptr + rows * stride_sn + g), FP16_MATH)
    w *= tl.load(scales_ptr + rows * stride_sn + g)[:, None]
    tl.store(out_ptr + offs_n[:, None] * stride_on + (k0 + tl.arange(0, BLOCK_K))[None, :],
             w.to(out_ptr.dtype.element_ty), mask=(offs_n < N)[:, None])


@triton.jit
def _int8_dot_kernel(
    xq_ptr, x_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K, k_per_split, stride_xm, stride_wn, stride_om, stride_os,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    offs_m, offs_n, xrows, rows, split, _ = _program_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = split * k_per_split
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.int32)  # out.T, as in _dot_kernel
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        k0 = tl.multiple_of(k0, BLOCK_K)
        a = tl.load(xq_ptr + xrows[:, None] * stride_xm + (k0 + offs_k)[None, :])  # int8 [BM, BK]
        b = tl.load(w_ptr + rows[:, None] * stride_wn + (k0 + offs_k)[None, :])  # int8 [BN, BK]
        acc = tl.dot(b, tl.trans(a), acc, out_dtype=tl.int32)  # exact for K < 2**17
    out = acc.to(tl.float32) * tl.load(w_scale_ptr + rows)[:, None]
    out *= tl.load(x_scale_ptr + xrows)[None, :]
    _store_tile(out_ptr + split * stride_os, out, bias_ptr, offs_m, offs_n, M, N, stride_om,
                HAS_BIAS)


@triton.jit
def _int8_tma_kernel(
    x_desc, w_desc, x_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # W8A8 for many rows (prefill): both int8 tiles arrive by TMA (x_desc [M, K], w_desc [N, K],
    # zero-filled past the edges), out = x @ W.T in the natural orientation so the epilogue's
    # stores run along N. H200, M = 2,048 at Llama-8B shapes: 1.81-2.02x fp16 cuBLAS, against
    # 1.54-1.73x for _int8_dot_kernel's pointer loads at its best tile (RESULTS.md).
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = x_desc.load([pid_m * BLOCK_M, k0])
        b = w_desc.load([pid_n * BLOCK_N, k0])
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)  # exact for K < 2**17
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out = acc.to(tl.float32) * tl.load(x_scale_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    out *= tl.load(w_scale_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _quantize_rows_kernel(x_ptr, xq_ptr, scale_ptr, K, stride_xm, stride_qm,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_xm + cols, mask=cols < K, other=0.0).to(tl.float32)
    q, scale = quantize_row(x)
    tl.store(xq_ptr + row * stride_qm + cols, q, mask=cols < K)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _sum_splits_kernel(part_ptr, bias_ptr, residual_ptr, out_ptr, num_splits, MN, N,
                       HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(num_splits):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    y = add_residual(acc, residual_ptr + offs, mask, HAS_RESIDUAL, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, y, mask=mask)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number keeps the grid small
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tiles(M: int, N: int, cfg: KernelConfig) -> int:
    """Output tiles of a launch (programs per split)."""
    return triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)


@functools.lru_cache(maxsize=16)
def _hopper(device: torch.device) -> bool:
    """A CUDA device with TMA: Hopper or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def _tma_loads(device: torch.device, K: int) -> bool:
    """Whether int8 [*, K] tiles can come by TMA: Hopper or newer (the interpreter emulates it)
    and rows of a multiple of 16 bytes."""
    if K % 16:
        return False
    if device.type != "cuda":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return _hopper(device)


def _half2_words_per_group(w: PreparedQuantWeight, block_k: int) -> int:
    """Words of one quantization group within a half2 GEMV K tile (its WPG)."""
    return min(block_k, w.group_size) * w.bits // 32


def _half2_tma_loads(device: torch.device, w: PreparedQuantWeight, block_k: int) -> bool:
    """Whether the half2 GEMV's codes can come by TMA: Hopper or later, and rows and
    each group's piece of a K tile multiples of 16 bytes."""
    block_k = _fit_block_k(block_k, w.group_size, w.in_features)
    return (_hopper(device) and w.in_features * w.bits % 128 == 0
            and _half2_words_per_group(w, block_k) % 4 == 0)


def _dot_tma_loads(device: torch.device, w: PreparedQuantWeight, block_k: int) -> bool:
    """Whether the weight-only dot kernel's codes can come by TMA: as ``_tma_loads`` for its
    packed rows, and a K tile (cut to the group) of at least 16 bytes of codes."""
    return (_tma_loads(device, w.in_features * w.bits // 8)
            and _fit_block_k(block_k, w.group_size) * w.bits >= 128)


def _fit_block_k(block_k: int, group_size: int, K: int | None = None) -> int:
    """The largest power of two <= block_k dividing group_size (which divides K); with ``K``
    (the half2 GEMV, whose tiles may span whole groups) one dividing K that either divides
    group_size or is a multiple of it."""
    if K is None:
        while group_size % block_k:
            block_k //= 2
        return block_k
    while K % block_k or (group_size % block_k and block_k % group_size):
        block_k //= 2
    return block_k


def choose_config(M: int, N: int, K: int, w: PreparedQuantWeight, num_sms: int,
                  half2: bool = False, tma: bool = False) -> KernelConfig:
    """Tile shape by M bucket, from sweeps on an H100 (bench.quant_kernels --sweep). Small M
    streams the weight once: split-K adds programs until ~2-8 per SM (4-bit unpacking costs
    more, so it wants more). Weight-only above DENSE_MIN_M rows dequantizes to a dense buffer
    for cuBLAS: dequantizing inside a Triton GEMM leaves the tensor cores waiting on the
    unpacking (0.5-0.65x fp16 at M=2048, against 0.85-0.9x). ``half2``: the packed-fp16
    GEMV can run (fp16 activations on CUDA); ``tma``: the device has TMA (Hopper)."""
    half2_gemv = w.act_bits == 16 and M <= GEMV_MAX_M and half2
    if half2_gemv and w.bits == 8:
        return _half2_w8_config(N, K)
    if half2_gemv and w.group_size == 128:
        return _half2_w4_g128_config(N, K, tma)
    if half2_gemv:
        # 4-bit in other group sizes; H200 sweep: 64 rows per program (more rows share each
        # x pair), K tiles within one group.
        cfg, per_sm = KernelConfig("gemv_h2", 1, 64, _fit_block_k(256, w.group_size)), 8
    elif w.act_bits == 16 and M <= GEMV_MAX_M:
        cfg, per_sm = KernelConfig("gemv", 1, 32, 256), 8 if w.bits == 4 else 4
    elif w.act_bits == 16 and M > DENSE_MIN_M:
        return KernelConfig("dequant", 1, 64, 128)
    elif w.act_bits == 16 and M <= 16 and tma:
        return _tma_dot_config(N, K, w.bits)
    elif M <= 16:
        cfg = KernelConfig("dot", 16, 64, 128 if w.bits == 4 else 256, num_stages=4)
        per_sm = 4 if w.bits == 4 and w.act_bits == 16 else 2
    elif w.act_bits == 16 and M <= DENSE_MIN_M and (w.bits == 4 or M > 128):
        return _weight_only_mid_m_config(M, N, K, num_sms)
    elif M <= 64 or w.act_bits == 8 and M <= 256:
        cfg = KernelConfig("dot", 64, 64, 128, num_stages=4)
        per_sm = 2
    elif w.act_bits == 16:  # M <= DENSE_MIN_M
        cfg, per_sm = KernelConfig("dot", 128, 64, 128, num_stages=3), 1
    else:  # W8A8 prefill: TMA loads where the device has them (quant_linear falls back)
        return KernelConfig("tma", 128, 128, 128, num_warps=8, num_stages=3)
    split = max(1, min(K // cfg.block_k, per_sm * num_sms // _tiles(M, N, cfg)))
    return KernelConfig(cfg.kernel, cfg.block_m, cfg.block_n, cfg.block_k, split,
                        cfg.num_warps, cfg.num_stages)


def _weight_only_mid_m_config(M: int, N: int, K: int, num_sms: int) -> KernelConfig:
    """Weight-only tiles for 17-256 rows of 4-bit and 129-256 rows of 8-bit weights (8-bit
    below keeps the older tiles: not swept yet), from H200 sweeps at Llama-8B shapes
    (RESULTS.md): up to 64 rows, 64 x 64 tiles and ~4 programs per SM, at most 4 splits;
    above, one tile of up to 256 rows (each weight tile is unpacked once), 8 warps and ~1
    program per SM, except where 128 x 128 tiles alone would fill more than the SMs (gate/up
    at 100-128 rows: 128 x 64 on 4 warps). Three stages (four cost up to 1.2x), and split-K
    by a power of two so that the splits are equal."""
    max_split = K // 128
    if M <= 64:
        cfg, per_sm, max_split = KernelConfig("dot", 64, 64, 128, num_stages=3), 4, 4
    elif M <= 128 and triton.cdiv(N, 128) > num_sms:
        return KernelConfig("dot", 128, 64, 128, 1, num_stages=3)
    else:
        cfg, per_sm = KernelConfig("dot", min(256, triton.next_power_of_2(M)), 128, 128,
                                   num_warps=8, num_stages=3), 1
    split = max(1, min(max_split, per_sm * num_sms // _tiles(M, N, cfg)))
    return dataclasses.replace(cfg, split_k=1 << (split.bit_length() - 1))


def _tma_dot_config(N: int, K: int, bits: int) -> KernelConfig:
    """Weight-only tiles for 2-16 rows with the codes by TMA, by projection shape: the best of
    24 (4-bit, groups of 128) or 48 (8-bit) tiles at 16 rows per Llama-8B projection on an H200
    (RESULTS.md, us per call against the plain-load "dot" default). Three stages throughout."""
    if bits == 4:
        if N >= 4 * K:
            return KernelConfig("dot_tma", 16, 64, 128, 2, num_stages=3)  # gate/up 48.8 -> 41.0
        if K > N:
            return KernelConfig("dot_tma", 16, 64, 128, 8, num_stages=3)  # down 28.1 -> 24.5
        return KernelConfig("dot_tma", 16, 64, 128, 4, num_stages=3)  # qkv 15.0 -> 13.5, o 11.2
    if N >= 4 * K:
        return KernelConfig("dot_tma", 16, 128, 256, 1, num_stages=3)  # gate/up 51.2 -> 40.1
    # qkv 17.3 -> 14.0, o 12.8 -> 11.2, down 28.0 -> 24.2
    return KernelConfig("dot_tma", 16, 64, 256, 4, num_stages=3)


def _half2_w4_g128_config(N: int, K: int, tma: bool) -> KernelConfig:
    """The half2 GEMV's tile for 4-bit, groups of 128, by projection shape: the best of a
    90-tile sweep per Llama-8B projection on an H200 with PDL (``python -m
    bench.quant_row_gemv``, RESULTS.md). Many short rows (gate/up) want few rows per program
    and no split; o wants tiles spanning two groups. With TMA (40 more tiles swept) the two
    large projections stream their codes that way; qkv and o gained nothing from it."""
    if tma and N >= 4 * K:
        return KernelConfig("gemv_h2_tma", 1, 128, 256, 1)  # gate/up: 26.5 us
    if tma and K > N:
        return KernelConfig("gemv_h2_tma", 1, 64, 512, 4, num_warps=8)  # down: 17.0 us
    if N >= 4 * K:
        return KernelConfig("gemv_h2", 1, 32, 256, 1)  # gate/up 28672 x 4096: 30.1 us (32.1)
    if N > K:
        return KernelConfig("gemv_h2", 1, 128, 128, 8)  # qkv 6144 x 4096: 9.7 us (11.1)
    if N == K:
        return KernelConfig("gemv_h2", 1, 64, 256, 4)  # o 4096 x 4096: 7.8 us (9.8)
    return KernelConfig("gemv_h2", 1, 64, 128, 16)  # down 4096 x 14336: 18.6 us (18.9)


def _half2_w8_config(N: int, K: int) -> KernelConfig:
    """The half2 GEMV's tile for 8-bit weights by projection shape (any group size: K tiles of
    256 span whole groups), the best of ``python -m bench.quant_row_gemv --schemes w8a16`` on
    an H200 with PDL (RESULTS.md, us per call at Llama-8B shapes, per-channel scales). Wide
    outputs keep 32 rows per program on 4 warps; square and tall ones (o, down) want 64 rows
    on 8 warps."""
    if N >= 4 * K:
        return KernelConfig("gemv_h2", 1, 32, 256, 1)  # gate/up 28672 x 4096: 36.3 us
    if N > K:
        return KernelConfig("gemv_h2", 1, 32, 256, 4)  # qkv 6144 x 4096: 11.7 us
    return KernelConfig("gemv_h2", 1, 64, 256, 4, num_warps=8)  # o 9.0 us, down 22.8 us


def quantize_rows(x: torch.Tensor) -> QuantizedActivation:
    """Dynamic per-row int8 (quantize_activations_per_token on the GPU) of x [M, K]."""
    M, K = x.shape
    out = QuantizedActivation.empty(M, K, x.dtype, x.device)
    block = triton.next_power_of_2(K)
    if M:
        _quantize_rows_kernel[(M,)](x, out.values, out.scales, K, x.stride(0),
                                    out.values.stride(0), BLOCK=block,
                                    num_warps=min(16, max(4, block // 1024)))
    return out


def quant_linear(x: torch.Tensor | QuantizedActivation, w: PreparedQuantWeight,
                 bias: torch.Tensor | None = None,
                 config: KernelConfig | None = None, *,
                 norm_weight: torch.Tensor | None = None, eps: float = 1e-6, silu: bool = False,
                 input_perm: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                 pdl: bool = False) -> torch.Tensor:
    """x [..., K] in w.dtype -> x @ W.T + bias, [..., N] in x.dtype. ``config`` overrides the
    tile choice (tuning, tests).

    One row of x with a weight-only W can fuse what dense_gemv fuses (batch-1 decode):
    ``norm_weight`` [K] (the input is RMSNorm(x) * norm_weight, ``eps`` the norm's), ``silu``
    (x is [1, 2K] = [gate | up], the input silu(gate) * up), ``input_perm`` [K] (input column
    k is column input_perm[k] of the above: an act-order gather), ``residual`` [1, N] (returns
    x W^T + residual) and ``pdl`` (a programmatic dependent launch, CUDA sm_90+).

    A W8A8 weight also takes x already quantized per row (``QuantizedActivation``, made by
    the kernel before: elementwise.rms_norm_int8 / silu_and_mul_int8)."""
    N, K = w.out_features, w.in_features
    k_in = 2 * K if silu else K
    int8_x = x if isinstance(x, QuantizedActivation) else None
    if int8_x is not None:
        if w.act_bits != 8:
            raise ValueError("int8 activations need a W8A8 weight, not a weight-only one")
        x = int8_x.values  # the shapes below; the dtype is the one x had
    dtype = int8_x.dtype if int8_x is not None else x.dtype
    if x.shape[-1] != k_in or dtype != w.dtype:
        raise ValueError(f"x {tuple(x.shape)} {dtype} does not match the weight: K={K}"
                         f"{' (x is [gate | up], 2K)' if silu else ''}, prepared for {w.dtype}")
    if bias is not None and (bias.shape != (N,) or bias.dtype != dtype):
        raise ValueError(f"bias must be [{N}] in {dtype}, got {tuple(bias.shape)} {bias.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k_in)
    if x2.stride(-1) != 1 or x2.stride(0) % 2 or x2.storage_offset() % 2:
        x2 = x2.contiguous()  # the half2 GEMV reads x as int32 pairs
    M = x2.shape[0]
    fusion = _check_fusion(M, N, K, dtype, w, norm_weight, silu, input_perm, residual)
    out = torch.empty(M, N, dtype=dtype, device=x.device)
    if M == 0:
        return out.view(*lead, N)
    cfg = _resolve_config(config, x2, w, fusion or pdl)
    if cfg.kernel == "dequant":
        dense = dequantize(w, cfg)
        if bias is None:
            torch.matmul(x2, dense.T, out=out)
        else:
            torch.addmm(bias, x2, dense.T, out=out)
    elif w.act_bits == 8:  # int8 rows: given, or quantized here
        _int8_linear(int8_x if int8_x is not None else quantize_rows(x2), w, bias, cfg, out)
    elif cfg.kernel in ("gemv", *_HALF2):
        fused = _OneRowFusion(norm_weight, eps, silu, input_perm, residual, pdl)
        (_half2_gemv if cfg.kernel in _HALF2 else _float_gemv)(x2, w, bias, cfg, out, fused)
    else:
        _dequantizing_dot(x2, w, bias, cfg, out)
    return out.view(*lead, N)


def _resolve_config(config: KernelConfig | None, x2: torch.Tensor, w: PreparedQuantWeight,
                    one_row_extras: bool) -> KernelConfig:
    """``config``, or choose_config's; errors for a kernel that cannot run here."""
    M, N, K = x2.shape[0], w.out_features, w.in_features
    half2 = (x2.dtype == torch.float16 and w.scales.dtype == torch.float16 and x2.is_cuda
             and os.environ.get("TRITON_INTERPRET") != "1")
    cfg = config or choose_config(M, N, K, w, _num_sms(x2.device), half2,
                                  tma=half2 and _hopper(x2.device))
    if cfg.kernel in _HALF2 and not half2:
        raise ValueError("the half2 GEMV needs fp16 activations on CUDA (not the interpreter)")
    if cfg.kernel == "gemv_h2_tma" and not _half2_tma_loads(x2.device, w, cfg.block_k):
        cfg = dataclasses.replace(cfg, kernel="gemv_h2")  # pre-Hopper GPUs, or unaligned rows
    if cfg.kernel == "tma" and (w.act_bits != 8 or cfg.split_k != 1):
        raise ValueError("the TMA kernel is for W8A8 without split-K")
    if cfg.kernel == "tma" and not _tma_loads(x2.device, K):
        cfg = dataclasses.replace(cfg, kernel="dot")  # pre-Hopper GPUs, or unaligned rows
    if cfg.kernel == "dot_tma" and w.act_bits != 16:
        raise ValueError("the dot_tma kernel is for weight-only weights; W8A8 has 'tma'")
    if cfg.kernel == "dot_tma" and not _dot_tma_loads(x2.device, w, cfg.block_k):
        # pre-Hopper GPUs, unaligned rows, or K tiles of codes under 16 bytes (4-bit g16)
        cfg = dataclasses.replace(cfg, kernel="dot")
    if one_row_extras and cfg.kernel not in ("gemv", *_HALF2):
        raise ValueError(f"norm / SiLU / gather / residual / PDL fuse only into the one-row "
                         f"GEMV kernels, not {cfg.kernel!r}")
    return cfg


@dataclass(frozen=True)
class _OneRowFusion:
    """quant_linear's one-row extras, passed on to the GEMV launchers."""

    norm_weight: torch.Tensor | None
    eps: float
    silu: bool
    input_perm: torch.Tensor | None
    residual: torch.Tensor | None
    pdl: bool

    @property
    def any(self) -> bool:
        """Norm, SiLU, gather or residual (pdl is a launch option, not a fusion)."""
        return (self.norm_weight is not None or self.silu or self.input_perm is not None
                or self.residual is not None)

    def meta(self, K: int) -> dict:
        """The kernels' fusion flags and launch options."""
        return dict(NORM=self.norm_weight is not None, SILU=self.silu,
                    PERM=self.input_perm is not None, K_POW2=triton.next_power_of_2(K),
                    PDL=self.pdl, **launch_options(self.pdl))


@dataclass(frozen=True)
class _Splits:
    """How a launch splits K: programs of split s cover columns s * k_per_split onwards, in
    BLOCK_K tiles; with more than one split they write float32 partials [num, M, N] to
    ``part`` for _sum_splits_kernel (or the half2 GEMV's last program) to add."""

    block_k: int
    k_per_split: int
    num: int
    part: torch.Tensor  # the output itself with one split

    @staticmethod
    def plan(cfg: KernelConfig, w: PreparedQuantWeight, out: torch.Tensor) -> _Splits:
        K = w.in_features
        block_k = _fit_block_k(cfg.block_k, w.group_size, K if cfg.kernel in _HALF2 else None)
        k_per_split = triton.cdiv(K // block_k, cfg.split_k) * block_k
        num = triton.cdiv(K, k_per_split)
        part = out if num == 1 else torch.empty(num, *out.shape, dtype=torch.float32,
                                                device=out.device)
        return _Splits(block_k, k_per_split, num, part)

    def meta(self, cfg: KernelConfig, bias: torch.Tensor | None) -> dict:
        """Tile and launch keywords every kernel here takes; the bias is added by the kernel
        only without splits (else by whoever adds the partials)."""
        return dict(HAS_BIAS=bias is not None and self.num == 1, BLOCK_N=cfg.block_n,
                    BLOCK_K=self.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def add_partials(self, bias: torch.Tensor | None, residual: torch.Tensor | None,
                     out: torch.Tensor) -> None:
        """out = sum of the partials (+ bias, + residual), when there is more than one."""
        if self.num == 1:
            return
        M, N = out.shape
        _sum_splits_kernel[(triton.cdiv(M * N, 1024),)](
            self.part, bias if bias is not None else out,
            residual if residual is not None else out, out, self.num, M * N, N,
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, BLOCK=1024)


def _int8_linear(xa: QuantizedActivation, w: PreparedQuantWeight, bias: torch.Tensor | None,
                 cfg: KernelConfig, out: torch.Tensor) -> None:
    """W8A8: int8 rows x int8 weight -> int32, scaled per row and channel, into ``out``."""
    (M, N), K = out.shape, w.in_features
    splits = _Splits.plan(cfg, w, out)
    xq, b = xa.values.reshape(M, K), bias if bias is not None else out
    meta = dict(BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m, **splits.meta(cfg, bias))
    if cfg.kernel == "tma":
        x_desc = TensorDescriptor.from_tensor(xq, [cfg.block_m, splits.block_k])
        w_desc = TensorDescriptor.from_tensor(w.qweight, [cfg.block_n, splits.block_k])
        _int8_tma_kernel[(_tiles(M, N, cfg),)](x_desc, w_desc, xa.scales, w.scales, b, out,
                                               M, N, K, N, **meta)
        return
    _int8_dot_kernel[(_tiles(M, N, cfg), splits.num)](
        xq, xa.scales, w.qweight, w.scales, b, splits.part, M, N, K, splits.k_per_split,
        xq.stride(0), w.qweight.stride(0), N, M * N, **meta)
    splits.add_partials(bias, None, out)


def _dequantizing_dot(x2: torch.Tensor, w: PreparedQuantWeight, bias: torch.Tensor | None,
                      cfg: KernelConfig, out: torch.Tensor) -> None:
    """Weight-only, several rows: _dot_kernel on the tensor cores, into ``out``."""
    (M, N), K = out.shape, w.in_features
    splits = _Splits.plan(cfg, w, out)
    qw_desc = w.qweight  # a placeholder the kernel leaves unread without TMA
    if cfg.kernel == "dot_tma":
        qw_desc = TensorDescriptor.from_tensor(w.qweight,
                                               [cfg.block_n, splits.block_k * w.bits // 8])
    _dot_kernel[(_tiles(M, N, cfg), splits.num)](
        x2, w.qweight, qw_desc, w.scales, w.zeros, bias if bias is not None else out,
        splits.part,
        M, N, K, splits.k_per_split, x2.stride(0), w.qweight.stride(0), w.scales.stride(0),
        N, M * N, BITS=w.bits, GROUP_SIZE=w.group_size, SCALE_AFTER_DOT=w.group_size == K,
        FP16_MATH=w.scales.dtype == torch.float16,
        PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", TMA=cfg.kernel == "dot_tma",
        BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m, **splits.meta(cfg, bias))
    splits.add_partials(bias, None, out)


def _float_gemv(x2: torch.Tensor, w: PreparedQuantWeight, bias: torch.Tensor | None,
                cfg: KernelConfig, out: torch.Tensor, f: _OneRowFusion) -> None:
    """Weight-only, one row: _gemv_kernel (float32 math), into ``out``."""
    (M, N), K = out.shape, w.in_features
    splits = _Splits.plan(cfg, w, out)
    res = f.residual.reshape(M, N) if f.residual is not None else None
    sum_residual = res is not None and splits.num > 1  # then _sum_splits_kernel adds it
    words = w.qweight.view(torch.int32)  # same bytes, 32 // bits codes per word
    # Fusion operands never read when their flag is off point at out.
    _gemv_kernel[(M, triton.cdiv(N, cfg.block_n), splits.num)](
        x2, words, w.scales, w.zeros, bias if bias is not None else out,
        _or(f.norm_weight, out), _or(f.input_perm, out), _or(res, out), splits.part,
        M, N, K, splits.k_per_split, f.eps, x2.stride(0), words.stride(0), w.scales.stride(0),
        _or(res, out).stride(0), N, M * N, 0x4B000000, BITS=w.bits, GROUP_SIZE=w.group_size,
        HAS_RESIDUAL=res is not None and not sum_residual, **f.meta(K),
        **splits.meta(cfg, bias))
    splits.add_partials(bias, res if sum_residual else None, out)


def _half2_gemv(x2: torch.Tensor, w: PreparedQuantWeight, bias: torch.Tensor | None,
                cfg: KernelConfig, out: torch.Tensor, f: _OneRowFusion) -> None:
    """Weight-only, one fp16 row on CUDA: gemv_half2_kernel (half2_gemv.py), into ``out``."""
    (M, N), K = out.shape, w.in_features
    splits = _Splits.plan(cfg, w, out)
    res = f.residual.reshape(M, N) if f.residual is not None else None
    words, x_pairs = w.qweight.view(torch.int32), x2.view(torch.int32)
    tiles_n = triton.cdiv(N, cfg.block_n)
    w_desc = words  # a placeholder the kernel leaves unread without TMA
    if cfg.kernel == "gemv_h2_tma":
        wpg = _half2_words_per_group(w, splits.block_k)
        gpt = splits.block_k * w.bits // 32 // wpg  # groups per K tile
        w_desc = TensorDescriptor.from_tensor(words.view(N, -1, wpg), [cfg.block_n, gpt, wpg])
    # Split-K partials summed inside the kernel by each tile's last program: a separate
    # reduction kernel cost 14% of a w4a16 batch-1 decode step (H200 profile).
    in_kernel = (splits.num > 1 and w.split_counters is not None
                 and M * tiles_n <= w.split_counters.numel())
    sum_residual = res is not None and splits.num > 1 and not in_kernel
    scratch = (torch.empty(M * tiles_n * splits.num * splits.k_per_split, dtype=x2.dtype,
                           device=x2.device) if f.any else out)
    gemv_half2_kernel[(M, tiles_n, splits.num)](
        x_pairs, words, w_desc, w.scales, w.zeros, bias if bias is not None else out,
        _or(f.norm_weight, out), _or(f.input_perm, out), _or(res, out), scratch, splits.part,
        out, w.split_counters if in_kernel else out, M, N, K, splits.k_per_split, splits.num,
        f.eps, x_pairs.stride(0), words.stride(0), w.scales.stride(0), _or(res, out).stride(0),
        N, M * N, BITS=w.bits, GROUP_SIZE=w.group_size, FUSED_SPLITS=in_kernel,
        HAS_RESIDUAL=res is not None and not sum_residual, TMA=cfg.kernel == "gemv_h2_tma",
        STAGES=cfg.num_stages, **f.meta(K),
        **{**splits.meta(cfg, bias), "HAS_BIAS": bias is not None and (splits.num == 1
                                                                        or in_kernel)})
    if not in_kernel:
        splits.add_partials(bias, res if sum_residual else None, out)


def _or(t: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    """A kernel's pointer argument: ``t``, or a placeholder its flag keeps unread."""
    return t if t is not None else default


def _check_fusion(M: int, N: int, K: int, dtype: torch.dtype, w: PreparedQuantWeight,
                  norm_weight: torch.Tensor | None, silu: bool, input_perm: torch.Tensor | None,
                  residual: torch.Tensor | None) -> bool:
    """Whether quant_linear was asked to fuse anything; a clear error for what it cannot."""
    fusion = norm_weight is not None or silu or input_perm is not None or residual is not None
    if not fusion:
        return False
    if M > GEMV_MAX_M or w.act_bits != 16:
        raise ValueError(f"norm / SiLU / gather / residual fuse into the one-row weight-only "
                         f"GEMV; got {M} rows, {w.act_bits}-bit activations")
    if norm_weight is not None and silu:
        raise ValueError("quant_linear fuses either an RMSNorm or a SiLU-and-mul, not both")
    if norm_weight is not None and (norm_weight.shape != (K,) or norm_weight.dtype != dtype
                                    or not norm_weight.is_contiguous()):
        raise ValueError(f"norm_weight must be [{K}] contiguous in {dtype}, got "
                         f"{tuple(norm_weight.shape)} {norm_weight.dtype}")
    if input_perm is not None and (input_perm.shape != (K,) or input_perm.dtype.is_floating_point
                                   or not input_perm.is_contiguous()):
        raise ValueError(f"input_perm must be [{K}] contiguous integers, got "
                         f"{tuple(input_perm.shape)} {input_perm.dtype}")
    if residual is not None and (residual.numel() != M * N or residual.dtype != dtype
                                 or not residual.is_contiguous()):
        raise ValueError(f"residual must be [{M}, {N}] contiguous in {dtype}, got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    return True


def dequantize(w: PreparedQuantWeight, config: KernelConfig | None = None) -> torch.Tensor:
    """The dense weight [N, K] in w.dtype (weight-only schemes): a transient buffer for
    prefill-sized matmuls."""
    if w.act_bits != 16:
        raise ValueError("dequantize is for weight-only schemes; W8A8 multiplies int8 directly")
    N, K = w.out_features, w.in_features
    cfg = config or KernelConfig("dequant", 1, 64, 128)
    block_k = _fit_block_k(cfg.block_k, w.group_size)
    dense = torch.empty(N, K, dtype=w.dtype, device=w.qweight.device)
    _dequantize_kernel[(triton.cdiv(N, cfg.block_n), K // block_k)](
        w.qweight, w.scales, w.zeros, dense, N, w.qweight.stride(0), w.scales.stride(0),
        dense.stride(0), BITS=w.bits, GROUP_SIZE=w.group_size,
        FP16_MATH=w.scales.dtype == torch.float16, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        num_warps=cfg.num_warps)
    return dense


def quant_linear_reference(x: torch.Tensor, qw: QuantizedWeight,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """The torch meaning of quant_linear, in float32: x @ W.T + bias with W = qw.dequantize();
    for W8A8, x is first quantized per token as the kernels do."""
    x2 = x.reshape(-1, x.shape[-1])
    if qw.act_bits == 8:
        x_q, scale = quantize_activations_per_token(x2)
        x2 = x_q.float() * scale
    out = x2.float() @ qw.dequantize(torch.float32).T
    if bias is not None:
        out = out + bias.float()
    return out.view(*x.shape[:-1], -1)
