"""Every Triton kernel against a torch reference on fresh random inputs (Triton's interpreter
on CPU with small shapes; real shapes with ``-m gpu``).

Tolerances: fp32 1e-4 (summation order only); fp16 2e-3 and bf16 1.6e-2 relative to unit-scale
outputs (the inputs' own rounding, 2^-11 and 2^-8, times a few accumulations)."""

from __future__ import annotations

import pytest
import torch
from conftest import newest_token_slots, random_tables, reference_attention

from twinfer_kernels.decode_attention import NewKV, decode_attention
from twinfer_kernels.elementwise import rms_norm, rms_norm_int8, silu_and_mul, silu_and_mul_int8
from twinfer_kernels.prefill_attention import make_tiles, prefill_attention
from twinfer_kernels.quant_matmul import quantize_rows
from twinfer_kernels.rotary_kv import rotary_and_write_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Triton 3.6's interpreter computes garbage for bfloat16 loads it converts (seen in every
# kernel here); bfloat16 is therefore checked on the GPU only (pytest -m gpu).
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
              DEVICE == "cpu", reason="Triton's CPU interpreter mishandles bfloat16"))]


def paged_cache(num_blocks, block_size, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(DEVICE, dtype)
    return k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim", [(1, 64), (4, 64), (8, 128), (4, 32)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention_matches_reference(dtype, group, head_dim, num_splits):
    hkv, block_size = 2, 16
    ctx_lens = [1, 17, 40, 0, 100]  # a single token, non-multiples of 16, an empty slot
    k_cache, v_cache = paged_cache(32, block_size, hkv, head_dim, dtype, seed=group)
    tables = random_tables(ctx_lens, block_size, 32, seed=head_dim)
    q = torch.randn(len(ctx_lens), hkv * group, head_dim).to(DEVICE, dtype)
    scale = head_dim ** -0.5
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    out = decode_attention(q, k_cache, v_cache, tables, ctx, scale, num_splits=num_splits,
                           block_n=32)
    ref = reference_attention(q, k_cache, v_cache, tables, ctx_lens, [1] * len(ctx_lens), scale)
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim", [(1, 64), (4, 32), (8, 128)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention_with_new_kv_equals_rotary_write_then_attention(dtype, group,
                                                                          head_dim, num_splits):
    """The fused decode step (rotate q and the new k, cache k/v, attend) gives what
    rotary_and_write_kv followed by decode_attention gives: same output, same caches."""
    hkv, block_size = 2, 16
    ctx_lens = [1, 17, 40, 0, 100]  # the newest token is each context's last; 0: padding row
    k_cache, v_cache = paged_cache(32, block_size, hkv, head_dim, dtype, seed=group + 7)
    tables = random_tables(ctx_lens, block_size, 32, seed=head_dim + 1)
    B, H = len(ctx_lens), hkv * group
    qkv = torch.randn(B, (H + 2 * hkv) * head_dim).to(DEVICE, dtype)  # fused-GEMM layout
    q, k, v = qkv.split([H * head_dim, hkv * head_dim, hkv * head_dim], dim=-1)
    q, k, v = q.view(B, H, head_dim), k.view(B, hkv, head_dim), v.view(B, hkv, head_dim)
    positions = torch.tensor([max(c - 1, 0) for c in ctx_lens], device=DEVICE)
    slots = newest_token_slots(tables, ctx_lens, block_size)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))).to(DEVICE)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5

    fused_k, fused_v = k_cache.clone(), v_cache.clone()
    q_before = q.clone()
    out = decode_attention(q, fused_k, fused_v, tables, ctx, scale, num_splits=num_splits,
                           block_n=32, new_kv=NewKV(k, v, positions, inv_freq, slots))
    assert torch.equal(q, q_before)  # the fused kernel rotates its own copy

    rotary_and_write_kv(q, k, v, positions, inv_freq, k_cache, v_cache, slots)
    ref = decode_attention(q, k_cache, v_cache, tables, ctx, scale, num_splits=num_splits,
                           block_n=32)
    # Same float32 math in both; only the compiler's FMA contraction may differ (1 ulp).
    torch.testing.assert_close(fused_k, k_cache, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(fused_v, v_cache, atol=0, rtol=0)
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("num_splits", [1, 3])
def test_attention_kernels_store_columns_where_out_cols_says(num_splits):
    """out_cols = argsort(perm) makes the kernels write o[:, perm] (what an act-order o_proj
    reads) instead of o: the same values, moved, for decode (split or not) and prefill."""
    hkv, group, head_dim, block_size = 2, 4, 32, 16
    ctx_lens = [1, 17, 40, 0]
    k_cache, v_cache = paged_cache(16, block_size, hkv, head_dim, torch.float32, seed=5)
    tables = random_tables(ctx_lens, block_size, 16, seed=6)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    H = hkv * group
    perm = torch.randperm(H * head_dim, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    cols = torch.argsort(perm).to(torch.int32)
    q = torch.randn(len(ctx_lens), H, head_dim).to(DEVICE)
    plain = decode_attention(q, k_cache, v_cache, tables, ctx, 0.2, num_splits=num_splits)
    moved = decode_attention(q, k_cache, v_cache, tables, ctx, 0.2, num_splits=num_splits,
                             out_cols=cols)
    assert torch.equal(moved.view(len(ctx_lens), -1), plain.view(len(ctx_lens), -1)[:, perm])

    q_lens = [1, 17, 40]
    qsl = torch.tensor([0, 1, 18, 58], dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(q_lens), H, head_dim).to(DEVICE)
    args = (q, k_cache, v_cache, tables[:3], qsl, ctx[:3], q_lens, 0.2)
    plain = prefill_attention(*args, block_m=16, block_n=16)
    moved = prefill_attention(*args, block_m=16, block_n=16, out_cols=cols)
    assert torch.equal(moved.view(sum(q_lens), -1), plain.view(sum(q_lens), -1)[:, perm])


def test_decode_attention_rejects_misshapen_new_kv():
    k_cache, v_cache = paged_cache(4, 16, 2, 32, torch.float32, seed=0)
    q = torch.randn(2, 4, 32, device=DEVICE)
    ctx = torch.tensor([3, 5], dtype=torch.int32, device=DEVICE)
    tables = torch.zeros(2, 1, dtype=torch.int32, device=DEVICE)
    bad = NewKV(torch.randn(2, 1, 32, device=DEVICE), torch.randn(2, 1, 32, device=DEVICE),
                ctx.long(), torch.ones(16, device=DEVICE), ctx.long())
    with pytest.raises(ValueError, match="new k and v must be"):
        decode_attention(q, k_cache, v_cache, tables, ctx, 1.0, new_kv=bad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim", [(1, 64), (4, 32), (8, 64)])
def test_prefill_attention_over_cached_prefixes_matches_reference(dtype, group, head_dim):
    hkv, block_size = 2, 16
    q_lens = [5, 1, 33, 20]  # chunks, a decode row, and a whole prompt
    ctx_lens = [37, 9, 33, 20]  # first two have cached earlier tokens (prefix / prior chunk)
    k_cache, v_cache = paged_cache(24, block_size, hkv, head_dim, dtype, seed=3)
    tables = random_tables(ctx_lens, block_size, 24, seed=4)
    q = torch.randn(sum(q_lens), hkv * group, head_dim).to(DEVICE, dtype)
    qsl = torch.tensor([0, 5, 6, 39, 59], dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    out = prefill_attention(q, k_cache, v_cache, tables, qsl, ctx, q_lens, head_dim ** -0.5,
                            block_m=16, block_n=16)
    ref = reference_attention(q, k_cache, v_cache, tables, ctx_lens, q_lens, head_dim ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("num_tiles", range(1, 10))
def test_make_tiles_rows_start_16_byte_aligned_for_any_tile_count(num_tiles):
    # Triton specializes pointer arguments on 16-byte alignment: an unaligned tile_start row
    # would compile a second kernel variant the first time a batch's tile count is not a
    # multiple of 4.
    q_lens = [16] * (num_tiles - 1) + [5]
    tiles = make_tiles(q_lens, 16, torch.device(DEVICE))
    tile_seq, tile_start = tiles
    assert tiles.shape == (2, num_tiles)
    assert tile_seq.tolist() == list(range(num_tiles))
    assert tile_start.tolist() == [0] * num_tiles
    assert tile_seq.data_ptr() % 16 == 0 and tile_start.data_ptr() % 16 == 0


@pytest.mark.parametrize("window", [0, 21])
def test_prefill_attention_of_long_chunks_matches_reference(window):
    # 16-row tiles over 70- and 53-token chunks (after 30 cached tokens): most key blocks are
    # visible to a whole tile (the unmasked loop), the rest straddle the diagonal or, with a
    # sliding window, its far edge.
    hkv, group, head_dim, block_size = 2, 2, 32, 16
    q_lens, ctx_lens = [70, 53], [70, 83]
    k_cache, v_cache = paged_cache(16, block_size, hkv, head_dim, torch.float32, seed=8)
    tables = random_tables(ctx_lens, block_size, 16, seed=9)
    q = torch.randn(sum(q_lens), hkv * group, head_dim).to(DEVICE)
    qsl = torch.tensor([0, 70, 123], dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    out = prefill_attention(q, k_cache, v_cache, tables, qsl, ctx, q_lens, 0.2, window or None,
                            block_m=16, block_n=16)
    ref = reference_attention(q, k_cache, v_cache, tables, ctx_lens, q_lens, 0.2, window)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_attention_at_llama_shapes_matches_reference_on_gpu(dtype):
    hkv, group, head_dim, block_size = 8, 4, 128, 16
    q_lens, ctx_lens = [2048, 300], [2048, 811]  # a prompt, and a chunk after cached tokens
    blocks = sum(-(-c // block_size) for c in ctx_lens)
    k_cache, v_cache = paged_cache(blocks, block_size, hkv, head_dim, dtype, seed=1)
    tables = random_tables(ctx_lens, block_size, blocks, seed=2)
    q = torch.randn(sum(q_lens), hkv * group, head_dim).to(DEVICE, dtype)
    qsl = torch.tensor([0, 2048, 2348], dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    out = prefill_attention(q, k_cache, v_cache, tables, qsl, ctx, q_lens, head_dim ** -0.5)
    ref = reference_attention(q, k_cache, v_cache, tables, ctx_lens, q_lens, head_dim ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, with_residual):
    x = torch.randn(7, 96).to(DEVICE, dtype)
    res = torch.randn(7, 96).to(DEVICE, dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(96)).to(DEVICE, dtype)
    out, new_res = rms_norm(x, w, 1e-6, res)
    s = x + res if with_residual else x
    ref = w * (s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    torch.testing.assert_close(new_res, s)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_can_return_its_output_columns_permuted(dtype, with_residual):
    x = torch.randn(5, 72).to(DEVICE, dtype)
    res = torch.randn(5, 72).to(DEVICE, dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(72)).to(DEVICE, dtype)
    perm = torch.randperm(72, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    plain, plain_res = rms_norm(x, w, 1e-6, res)
    out, new_res = rms_norm(x, w, 1e-6, res, out_perm=perm)
    torch.testing.assert_close(out, plain[:, perm], atol=0, rtol=0)
    torch.testing.assert_close(new_res, plain_res, atol=0, rtol=0)  # the stream is not permuted


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [5, 64, 1100])
def test_silu_and_mul_matches_reference(dtype, n):
    x = torch.randn(4, 2 * n).to(DEVICE, dtype)
    ref = torch.nn.functional.silu(x[:, :n].float()) * x[:, n:].float()
    torch.testing.assert_close(silu_and_mul(x).float(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_int8_equals_quantizing_the_norm_afterwards(dtype, with_residual):
    x = torch.randn(5, 96).to(DEVICE, dtype)
    x[1] = 0  # an all-zero row: the minimum scale
    res = torch.randn(5, 96).to(DEVICE, dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(96)).to(DEVICE, dtype)
    q, new_res = rms_norm_int8(x, w, 1e-6, res)
    out, ref_res = rms_norm(x, w, 1e-6, res)
    ref = quantize_rows(out)
    assert q.dtype == dtype and torch.equal(new_res, ref_res)
    assert torch.equal(q.values, ref.values) and torch.equal(q.scales, ref.scales)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [40, 1000])  # 1000: one program spans the row beyond 1024 lanes
def test_silu_and_mul_int8_equals_quantizing_the_product_afterwards(dtype, n):
    x = torch.randn(3, 2 * n).to(DEVICE, dtype)
    q, ref = silu_and_mul_int8(x), quantize_rows(silu_and_mul(x))
    assert q.values.shape == (3, n) and q.dtype == dtype
    assert torch.equal(q.values, ref.values) and torch.equal(q.scales, ref.scales)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,head_dim", [(1, 32), (4, 64), (8, 128)])
def test_rotary_and_write_kv_match_reference(dtype, group, head_dim):
    from engine_torch.layers import apply_rotary, rotary_cos_sin

    hkv, T = 2, 6
    qkv = torch.randn(T, (group + 2) * hkv * head_dim).to(DEVICE, dtype)  # fused-GEMM layout
    q, k, v = qkv.split([group * hkv * head_dim, hkv * head_dim, hkv * head_dim], dim=-1)
    q, k, v = q.view(T, -1, head_dim), k.view(T, hkv, head_dim), v.view(T, hkv, head_dim)
    positions = torch.tensor([0, 1, 17, 1000, 4095, 3], device=DEVICE)
    slots = torch.tensor([5, 63, 16, 0, 40, -1], device=DEVICE)  # last: padding row
    inv_freq = (1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))).to(DEVICE)
    cos, sin = rotary_cos_sin(positions, inv_freq, torch.float32)
    q_ref, k_ref, v_ref = apply_rotary(q.float(), cos, sin), apply_rotary(k.float(), cos, sin), \
        v.clone()
    k_cache = torch.zeros(4, 16, hkv, head_dim, dtype=dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    rotary_and_write_kv(q, k, v, positions, inv_freq, k_cache, v_cache, slots)
    tol = TOL[dtype] * 4  # angles up to 4095 rad: fp32 cos/sin lose a few more bits
    torch.testing.assert_close(q.float(), q_ref, atol=tol, rtol=TOL[dtype])
    torch.testing.assert_close(k.float(), k_ref, atol=tol, rtol=TOL[dtype])
    flat_k, flat_v = k_cache.view(-1, hkv, head_dim), v_cache.view(-1, hkv, head_dim)
    written = slots[:-1].long()
    torch.testing.assert_close(flat_k[written].float(), k_ref[:-1], atol=tol, rtol=TOL[dtype])
    torch.testing.assert_close(flat_v[written], v_ref[:-1])
    untouched = torch.ones(64, dtype=torch.bool, device=DEVICE)
    untouched[written] = False
    assert flat_k[untouched].abs().sum() == 0 and flat_v[untouched].abs().sum() == 0
