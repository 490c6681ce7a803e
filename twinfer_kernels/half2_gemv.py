"""Weight-only GEMV (one row of x) in packed half2 math: fp16 activations on NVIDIA GPUs only.

Why: the float32 GEMV in quant_matmul.py spends ~3 instructions per code (mask-and-OR into a
float's mantissa, subtract, FMA) plus a share of x's loads and conversions, and at one row that
instruction stream, not HBM, sets its speed (H200: ~3 T codes/s, 20-38% of copy bandwidth on
4-bit). Here one LOP3 turns two 4-bit codes into the fp16 pair (1024 + q_a, 1024 + q_b)
(0x6400 is 1024, whose ulp is 1), one HFMA2 makes the exact pair ((q - z) / 16) and one HFMA2
multiplies by x and accumulates: ~2.1 instructions per 4-bit code, ~2.5 per 8-bit code, all
in inline PTX (Triton has no packed fp16 ops), so this kernel does not run under the CPU
interpreter; quant_matmul falls back to the float32 GEMV there and for bf16 / fp32.

Numerics: codes minus zero are exact (|q - z| <= 15 or 255, scaled by 1/16 or 1/256); x is
pre-scaled by 1/4, so that no half2 lane can overflow even at |x| = 65504 (a lane sums at most
4 products of |x / 4| * 15/16, or 2 of |x / 4| * 255/256); each word's lanes (8 or 4 products)
are converted to float32 and accumulated there, with the group scale applied per K tile as in
the float32 kernel. So the only fp16 roundings beyond the reference's are those of up to four
products and their partial sums: ~1e-3 relative to a word's partial sum.

Codes keep prepare_quant_weight's packing (code k of a word at bits BITS * k), so the pair a
LOP3 extracts is (k, k + 4) for 4-bit and (k, k + 2) for 8-bit; x's pairs are permuted to
match with PRMT once per K tile and thread, which every row the thread holds shares.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from twinfer_kernels.gemv_fusion import add_residual, gathered_input, row_rstd

# (x_a, x_a+1), (x_b, x_b+1) -> (x_a, x_b) / 4, (x_a+1, x_b+1) / 4; 0x3400 is fp16 0.25.
_PAIR_X_ASM = tl.constexpr("""{
.reg .b32 quarter;
mov.b32 quarter, 0x34003400;
prmt.b32 $0, $2, $3, 0x5410;
prmt.b32 $1, $2, $3, 0x7632;
mul.rn.f16x2 $0, $0, quarter;
mul.rn.f16x2 $1, $1, quarter;
}""")

# The end of both dot products: the half2 accumulator's two lanes, summed in float32, into $0.
_LANES_TO_F32 = """mov.b32 {l, h}, acc;
cvt.f32.f16 f0, l;
cvt.f32.f16 f1, h;
add.f32 $0, f0, f1;
"""

# $1: word of eight 4-bit codes; $2..$5: x pairs (k, k + 4) / 4 for k = 0..3; $6 / $7: the
# pairs -(64 + z / 16) and -(4 + z / 16). Low nibbles of each byte become 1024 + q, high ones
# 1024 + 16 q; the FMAs by 1/16 (0x2C00) and 1/256 (0x1C00) turn both into (q - z) / 16.
_DOT_W4_ASM = tl.constexpr("""{
.reg .b32 hi, a0, a1, a2, a3, acc, c16, c256;
.reg .b16 l, h;
.reg .f32 f0, f1;
mov.b32 c16, 0x2C002C00;
mov.b32 c256, 0x1C001C00;
shr.u32 hi, $1, 8;
lop3.b32 a0, $1, 0x000f000f, 0x64006400, 0xea;
lop3.b32 a1, $1, 0x00f000f0, 0x64006400, 0xea;
lop3.b32 a2, hi, 0x000f000f, 0x64006400, 0xea;
lop3.b32 a3, hi, 0x00f000f0, 0x64006400, 0xea;
fma.rn.f16x2 a0, a0, c16, $6;
fma.rn.f16x2 a1, a1, c256, $7;
fma.rn.f16x2 a2, a2, c16, $6;
fma.rn.f16x2 a3, a3, c256, $7;
mul.rn.f16x2 acc, a0, $2;
fma.rn.f16x2 acc, a1, $3, acc;
fma.rn.f16x2 acc, a2, $4, acc;
fma.rn.f16x2 acc, a3, $5, acc;
""" + _LANES_TO_F32 + "}")

# $1: word of four 8-bit codes; $2 / $3: x pairs (0, 2) / 4 and (1, 3) / 4; $4: the pair
# -(4 + z / 256). Bytes become 1024 + q; the FMA by 1/256 makes (q - z) / 256.
_DOT_W8_ASM = tl.constexpr("""{
.reg .b32 hi, a0, a1, acc, c256;
.reg .b16 l, h;
.reg .f32 f0, f1;
mov.b32 c256, 0x1C001C00;
shr.u32 hi, $1, 8;
lop3.b32 a0, $1, 0x00ff00ff, 0x64006400, 0xea;
lop3.b32 a1, hi, 0x00ff00ff, 0x64006400, 0xea;
fma.rn.f16x2 a0, a0, c256, $4;
fma.rn.f16x2 a1, a1, c256, $4;
mul.rn.f16x2 acc, a0, $2;
fma.rn.f16x2 acc, a1, $3, acc;
""" + _LANES_TO_F32 + "}")


@triton.jit
def _x_pairs(pa, pb):
    """x pairs (a, a + 1) and (b, b + 1) as int32 -> (a, b) / 4 and (a + 1, b + 1) / 4."""
    return tl.inline_asm_elementwise(_PAIR_X_ASM, "=r,=r,r,r", [pa, pb],
                                     dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _tile_qparams(zeros_ptr, scales_ptr, rows, groups, stride_sn, kw,
                  PER_WORD: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """Zero point bits and scales [BN, GPT] of K tile ``kw``'s (in words) ``groups``."""
    zs = rows[:, None] * stride_sn + (kw * PER_WORD // GROUP_SIZE + groups)[None, :]
    z = tl.load(zeros_ptr + zs).to(tl.int16, bitcast=True).to(tl.int32)
    return z, tl.load(scales_ptr + zs)


@triton.jit
def _tile_weights(w_ptrs, zeros_ptr, scales_ptr, rows, groups, stride_sn, kw,
                  PER_WORD: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """What K tile ``kw`` (in words) reads of the weight: codes [BN, GPT, WPG], zero point bits
    and scales [BN, GPT] of the tile's ``groups`` (offsets 0 .. GPT - 1)."""
    z, s = _tile_qparams(zeros_ptr, scales_ptr, rows, groups, stride_sn, kw, PER_WORD,
                         GROUP_SIZE)
    return tl.load(w_ptrs + kw), z, s


@triton.jit
def _tile_x(x_pairs, cols, kw, PER_WORD: tl.constexpr):
    """K tile ``kw``'s input as int32 pairs: four per word for 4-bit, two for 8-bit."""
    P = x_pairs + kw * PER_WORD // 2 + cols * (PER_WORD // 2)  # first pair of each word
    p0 = tl.load(P)
    p1 = tl.load(P + 1)
    if PER_WORD == 8:
        p2 = tl.load(P + 2)
        p3 = tl.load(P + 3)
    else:
        p2 = p0
        p3 = p1
    return p0, p1, p2, p3


@triton.jit
def _fused_input_pairs(x_row, norm_w_ptr, perm_ptr, scratch_ptr, k_lo, k_hi, K, eps,
                       NORM: tl.constexpr, SILU: tl.constexpr, PERM: tl.constexpr,
                       K_POW2: tl.constexpr, BLOCK_K: tl.constexpr):
    """The program's input columns k_lo .. k_hi computed once (RMSNorm / SiLU-and-mul /
    gather, gemv_fusion.gathered_input), stored to its scratch row and returned as the base
    of int32 pairs indexed like x's. Computed in the K tile's loop instead, each value would
    be recomputed by every thread sharing its column (16 at 64 rows, 4 warps): measured
    1.5-2.3x slower than the plain GEMV on the H200."""
    x16 = x_row.to(tl.pointer_type(tl.float16))
    rstd = 1.0
    if NORM:
        rstd = row_rstd(x16, K, eps, K_POW2)
    offs = tl.arange(0, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        xin = gathered_input(x16, norm_w_ptr.to(tl.pointer_type(tl.float16)), perm_ptr,
                             k0 + offs, K, rstd, NORM, SILU, PERM, tl.float16)
        tl.store(scratch_ptr + (k0 - k_lo) + offs, xin)
    tl.debug_barrier()  # the block's stores are visible to all its threads after this
    return scratch_ptr.to(tl.pointer_type(tl.int32)) - k_lo // 2


# $1: a zero point's fp16 bits (sign-extended to 32) -> $0 = the pair -(64 + z / 16) (0xAC00 is
# -1/16, 0xD400 is -64) and $1 = -(4 + z / 16) = $0 + 60 (0x5380); all exact in fp16.
_ZERO_PAIRS_W4_ASM = tl.constexpr("""{
.reg .b32 z2, c, d;
prmt.b32 z2, $2, $2, 0x1010;
mov.b32 c, 0xAC00AC00;
mov.b32 d, 0xD400D400;
fma.rn.f16x2 $0, z2, c, d;
mov.b32 c, 0x53805380;
add.rn.f16x2 $1, $0, c;
}""")

# The same for 8-bit: $0 = the pair -(4 + z / 256) (0x9C00 is -1/256, 0xC400 is -4).
_ZERO_PAIR_W8_ASM = tl.constexpr("""{
.reg .b32 z2, c, d;
prmt.b32 z2, $1, $1, 0x1010;
mov.b32 c, 0x9C009C00;
mov.b32 d, 0xC400C400;
fma.rn.f16x2 $0, z2, c, d;
}""")


@triton.jit
def _fence_gpu(t):
    """fence.acq_rel.gpu in every thread holding elements of ``t``."""
    tl.inline_asm_elementwise("fence.acq_rel.gpu;\nmov.u32 $0, 0;", "=r,r", [t],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _input_pairs(x_ptr, norm_w_ptr, perm_ptr, scratch_ptr, row, pid_n, split, stride_xm, k_lo,
                 kw_end, k_per_split, K, eps, PER_WORD: tl.constexpr, NORM: tl.constexpr,
                 SILU: tl.constexpr, PERM: tl.constexpr, K_POW2: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """The base of the program's input pairs: x's row, or its fused input (_fused_input_pairs)
    in the program's scratch slot."""
    x_pairs = x_ptr + row * stride_xm
    if NORM or SILU or PERM:
        slot = (row * tl.num_programs(1) + pid_n) * tl.num_programs(2) + split
        x_pairs = _fused_input_pairs(
            x_pairs, norm_w_ptr, perm_ptr, scratch_ptr + slot * k_per_split, k_lo,
            kw_end * PER_WORD, K, eps, NORM, SILU, PERM, K_POW2, BLOCK_K)
    return x_pairs


@triton.jit
def _tile_dot(acc2, words, z, s, p0, p1, p2, p3, BITS: tl.constexpr):
    """acc2 [BN, GPT, WPG] plus one K tile's products: codes ``words``, zero point bits ``z``
    and scales ``s`` [BN, GPT], x pairs p0..p3 from _tile_x."""
    s = s.to(tl.float32)
    if BITS == 4:
        x04, x15 = _x_pairs(p0, p2)
        x26, x37 = _x_pairs(p1, p3)
        z_lo, z_hi = tl.inline_asm_elementwise(_ZERO_PAIRS_W4_ASM, "=r,=r,r", [z],
                                               dtype=(tl.int32, tl.int32), is_pure=True,
                                               pack=1)
        part = tl.inline_asm_elementwise(
            _DOT_W4_ASM, "=r,r,r,r,r,r,r,r",
            [words, x04[None, :, :], x15[None, :, :], x26[None, :, :], x37[None, :, :],
             z_lo[:, :, None], z_hi[:, :, None]],
            dtype=tl.float32, is_pure=True, pack=1)
        return acc2 + part * (s * 64.0)[:, :, None]  # undo (q - z) / 16 and x / 4
    x02, x13 = _x_pairs(p0, p1)
    z_pair = tl.inline_asm_elementwise(_ZERO_PAIR_W8_ASM, "=r,r", [z], dtype=tl.int32,
                                       is_pure=True, pack=1)
    part = tl.inline_asm_elementwise(
        _DOT_W8_ASM, "=r,r,r,r,r",
        [words, x02[None, :, :], x13[None, :, :], z_pair[:, :, None]],
        dtype=tl.float32, is_pure=True, pack=1)
    return acc2 + part * (s * 1024.0)[:, :, None]  # undo (q - z) / 256 and x / 4


@triton.jit
def gemv_half2_kernel(
    x_ptr, qw_ptr, w_desc, scales_ptr, zeros_ptr, bias_ptr, norm_w_ptr, perm_ptr, residual_ptr,
    scratch_ptr, part_ptr, out_ptr, counters_ptr,
    M, N, K, k_per_split, num_splits, eps, stride_xm, stride_qn, stride_sn, stride_rm,
    stride_om, stride_os,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    FUSED_SPLITS: tl.constexpr, NORM: tl.constexpr, SILU: tl.constexpr, PERM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, K_POW2: tl.constexpr, PDL: tl.constexpr, TMA: tl.constexpr,
    STAGES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # x_ptr: x [M, K] fp16 viewed as int32 [M, K / 2] (stride_xm in pairs; [M, K] = [gate |
    # up] pairs with SILU); norm_w_ptr: fp16 [K]; scratch_ptr: fp16, k_per_split per program
    # (NORM, SILU or PERM); qw_ptr: the codes viewed as int32 [N, K / PER_WORD]. Grid as in
    # _gemv_kernel. Split-K programs write float32 partials [SPLIT, M, N] to part_ptr;
    # without FUSED_SPLITS a second kernel adds them, with it each tile's last program to
    # finish (counted in counters_ptr, one int32 per tile, left at zero) adds them in split
    # order, so the result stays deterministic. NORM / SILU / PERM /
    # HAS_RESIDUAL / PDL: as in _gemv_kernel (the residual is added where the result is
    # stored in the output dtype: by the last program, or with one split). TMA: the codes come
    # through w_desc (a descriptor over them viewed [N, K / (PER_WORD * WPG), WPG], blocks
    # [BLOCK_N, GPT, WPG]) into a STAGES-deep shared-memory pipeline.
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    # A K tile may span several quantization groups (longer contiguous reads per row): it is
    # held as [BLOCK_N, GPT groups, WPG words], so each group's scale broadcasts over its words.
    GPT: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K > GROUP_SIZE else 1
    WPG: tl.constexpr = WORDS // GPT
    row, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N
    groups = tl.arange(0, GPT)
    cols = groups[:, None] * WPG + tl.arange(0, WPG)[None, :]  # [GPT, WPG] words of the tile
    w_ptrs = qw_ptr + rows[:, None, None] * stride_qn + cols[None, :, :]
    k_lo = split * k_per_split
    kw_end = tl.minimum(k_lo + k_per_split, K) // PER_WORD
    acc2 = tl.zeros([BLOCK_N, GPT, WPG], tl.float32)
    if not TMA:  # the first tile's weights depend on no earlier kernel: out before the wait
        words_n, z_n, s_n = _tile_weights(w_ptrs, zeros_ptr, scales_ptr, rows, groups,
                                          stride_sn, k_lo // PER_WORD, PER_WORD, GROUP_SIZE)
    if PDL:
        gdc_wait()
    x_pairs = _input_pairs(x_ptr, norm_w_ptr, perm_ptr, scratch_ptr, row, pid_n, split,
                           stride_xm, k_lo, kw_end, k_per_split, K, eps, PER_WORD, NORM, SILU,
                           PERM, K_POW2, BLOCK_K)
    if TMA:
        # Hopper: the copy engine streams the codes STAGES - 1 tiles ahead while the warps
        # compute, where the register prefetch below holds one tile in flight per thread
        # (H200, 4-bit: gate/up 29.8 -> 26.5 us, down 18.5 -> 17.0; RESULTS.md).
        for kw in tl.range(k_lo // PER_WORD, kw_end, WORDS, num_stages=STAGES):
            words = w_desc.load([pid_n * BLOCK_N, kw // WPG, 0])
            z, s = _tile_qparams(zeros_ptr, scales_ptr, rows, groups, stride_sn, kw, PER_WORD,
                                 GROUP_SIZE)
            p0, p1, p2, p3 = _tile_x(x_pairs, cols, kw, PER_WORD)
            acc2 = _tile_dot(acc2, words, z, s, p0, p1, p2, p3, BITS)
    else:
        # Every input of the next K tile is loaded before this one's math (software
        # pipelining: the zero points, scales and x are latency-bound loads otherwise waited
        # on each tile).
        p0_n, p1_n, p2_n, p3_n = _tile_x(x_pairs, cols, k_lo // PER_WORD, PER_WORD)
        for kw in range(k_lo // PER_WORD, kw_end, WORDS):
            words, z, s = words_n, z_n, s_n
            p0, p1, p2, p3 = p0_n, p1_n, p2_n, p3_n
            kw_next = tl.multiple_of(tl.minimum(kw + WORDS, kw_end - WORDS), WORDS)  # last: again
            words_n, z_n, s_n = _tile_weights(w_ptrs, zeros_ptr, scales_ptr, rows, groups,
                                              stride_sn, kw_next, PER_WORD, GROUP_SIZE)
            p0_n, p1_n, p2_n, p3_n = _tile_x(x_pairs, cols, kw_next, PER_WORD)
            acc2 = _tile_dot(acc2, words, z, s, p0, p1, p2, p3, BITS)
    if PDL:  # the weights are read: the next kernel may start loading its own
        gdc_launch_dependents()
    acc = tl.sum(tl.sum(acc2, axis=2), axis=1)
    if FUSED_SPLITS:
        part_row = part_ptr + row * stride_om + offs_n
        tl.store(part_row + split * stride_os, acc, mask=offs_n < N)
        # As CUDA's threadFenceReduction: every thread fences its partial GPU-wide, the block
        # syncs, then one atomic counts the tile (acq_rel: the last program's reads below see
        # the other programs' partials).
        _fence_gpu(acc)
        tl.debug_barrier()
        tile = counters_ptr + row * tl.num_programs(1) + pid_n
        if tl.atomic_add(tile, 1, sem="acq_rel", scope="gpu") == num_splits - 1:
            acc = tl.zeros([BLOCK_N], tl.float32)
            for s in range(num_splits):
                acc += tl.load(part_row + s * stride_os, mask=offs_n < N, other=0.0,
                               cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
            y = add_residual(acc, residual_ptr + row * stride_rm + offs_n, offs_n < N,
                             HAS_RESIDUAL, out_ptr.dtype.element_ty)
            tl.store(out_ptr + row * stride_om + offs_n, y, mask=offs_n < N)
            tl.atomic_xchg(tile, 0, sem="relaxed", scope="gpu")  # ready for the next call
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        y = add_residual(acc, residual_ptr + row * stride_rm + offs_n, offs_n < N,
                         HAS_RESIDUAL, part_ptr.dtype.element_ty)
        tl.store(part_ptr + split * stride_os + row * stride_om + offs_n, y, mask=offs_n < N)

