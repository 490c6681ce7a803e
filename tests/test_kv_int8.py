"""The int8 KV cache (``kv_cache_dtype="int8"``): per-token, per-head symmetric codes that halve
the cache's bytes, read back dequantized by engine_torch; what it costs in accuracy."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import collect_logits
from test_kernels import DEVICE, TOL, random_tables, reference_attention

from engine_torch.attention import _gather, write_kv_cache
from twinfer import LLM, SamplingParams
from twinfer.config import CacheConfig
from twinfer.kv_cache_memory import (
    Int8KVCache,
    allocate_kv_caches,
    dequantize_kv,
    determine_num_kv_blocks,
    kv_block_bytes,
    quantize_kv,
)
from twinfer.weights import load_weights
from twinfer_kernels.decode_attention import NewKV, decode_attention
from twinfer_kernels.prefill_attention import prefill_attention
from twinfer_kernels.rotary_kv import rotary_and_write_kv

PROMPTS = [[0, 5, 9, 33, 7, 100, 200, 3, 4, 8, 19, 40, 41, 42, 43, 44, 45, 46, 47, 48],
           [0, 17, 250, 11]]


@pytest.mark.parametrize("head_dim", [1, 3, 64, 80])
def test_quantize_kv_round_trip_error_is_at_most_half_a_step(head_dim):
    # vectors whose sizes differ by orders of magnitude, as keys across heads do
    g = torch.Generator().manual_seed(head_dim)
    x = torch.randn(7, 5, head_dim, generator=g) * torch.logspace(-3, 3, 5)[:, None]
    codes, scales = quantize_kv(x)
    assert codes.dtype == torch.int8 and scales.shape == x.shape[:-1]
    assert codes.abs().amax(-1).eq(127).all()  # each vector uses the whole int8 range
    err = (dequantize_kv(codes, scales, torch.float32) - x).abs()
    assert (err <= scales[..., None] * 0.5 * (1 + 1e-5)).all()


def test_quantize_kv_of_a_zero_vector_is_zero():
    codes, scales = quantize_kv(torch.zeros(2, 3, 8))
    assert not codes.any() and not scales.any()
    assert not dequantize_kv(codes, scales, torch.float16).any()


def test_int8_block_takes_about_half_the_bytes_of_fp16(tiny_model_factory):
    cfg = load_weights(tiny_model_factory("llama")).config
    fp16 = kv_block_bytes(cfg, 16, torch.float16)
    int8 = kv_block_bytes(cfg, 16, torch.float16, "int8")
    assert int8 == fp16 // 2 + 2 * cfg.num_layers * 16 * cfg.num_kv_heads * 4  # + scales


def test_int8_cache_fits_more_blocks_in_the_same_budget(tiny_model_factory):
    cfg = load_weights(tiny_model_factory("llama")).config
    budget = 1 << 20

    def blocks(kv_dtype: str) -> int:
        return determine_num_kv_blocks(cfg, CacheConfig(cpu_kv_cache_bytes=budget,
                                                        kv_cache_dtype=kv_dtype),
                                       torch.float32, "cpu")

    assert blocks("int8") == budget // kv_block_bytes(cfg, 16, torch.float32, "int8")
    assert blocks("int8") > 3 * blocks("auto")  # float32 model: 4 bytes -> ~1 per value


def test_allocated_int8_caches_take_the_bytes_the_budget_counts(tiny_model_factory):
    cfg = load_weights(tiny_model_factory("llama")).config
    caches = allocate_kv_caches(cfg, 5, 16, torch.float16, "cpu", "int8")
    total = sum(t.numel() * t.element_size() for pair in caches for c in pair
                for t in (c.codes, c.scales))
    assert total == 5 * kv_block_bytes(cfg, 16, torch.float16, "int8")


def test_unknown_kv_cache_dtype_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8.*fp8"):
        CacheConfig(kv_cache_dtype="fp8")


def test_written_int8_slots_read_back_as_their_dequantized_values():
    g = torch.Generator().manual_seed(0)
    blocks, bs, hkv, d = 4, 4, 2, 8
    caches = [Int8KVCache(torch.full((blocks, bs, hkv, d), 99, dtype=torch.int8),
                          torch.full((blocks, bs, hkv), float("nan"))) for _ in range(2)]
    k, v = torch.randn(6, hkv, d, generator=g), torch.randn(6, hkv, d, generator=g)
    slots = torch.tensor([8, 9, 10, 11, 0, 1])  # block 2, then block 0
    write_kv_cache(k, v, caches[0], caches[1], slots)
    got_k, got_v = _gather(caches[0], caches[1], torch.tensor([[2, 0]]), 6, torch.float32)
    for got, x in ((got_k, k), (got_v, v)):
        torch.testing.assert_close(got[0], dequantize_kv(*quantize_kv(x), torch.float32))


@pytest.mark.parametrize("chunk", [3, 64])  # chunked prefill reads int8 keys it wrote earlier
def test_engine_torch_with_int8_kv_stays_close_to_the_model_dtype_cache(tiny_model_factory,
                                                                        chunk):
    path = tiny_model_factory("llama")
    decode = [[1, 2, 3, 4, 5], [6, 7, 8]]
    exact = collect_logits(path, PROMPTS, chunk, decode)
    int8 = collect_logits(path, PROMPTS, chunk, decode, kv_cache_dtype="int8")
    for a, b in zip(int8, exact):
        assert not torch.equal(a, b)  # the codes, not the float values, were read
        # int8 steps are ~0.4% of each vector's largest value: logits move by about that
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02 * b.abs().max().item())


def test_int8_kv_returns_every_block_after_generation(tiny_model_factory):
    llm = LLM(str(tiny_model_factory("llama")), engine="torch", dtype="float32",
              max_model_len=128, num_kv_blocks=32, kv_cache_dtype="int8")
    outs = llm.generate([[0, 5, 9, 33], [0, 17, 250]], SamplingParams(max_tokens=20,
                                                                       ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [20, 20]
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks == 32


def _cli(argv: list[str]) -> int:
    from twinfer import cli_eval

    parser = argparse.ArgumentParser()
    cli_eval.register(parser.add_subparsers(dest="command"))
    return cli_eval.run(parser.parse_args(argv))


@pytest.mark.slow
def test_smollm2_int8_kv_costs_under_one_percent_of_perplexity(smollm2_path, tmp_path):
    # The real model on real text: the int8 cache's damage measured as `twinfer eval kld`
    # measures it, against the same model with its cache in float32.
    from twinfer.eval_data import load_wikitext2

    try:
        text = load_wikitext2()
    except FileNotFoundError:
        pytest.skip("../shared/data/wikitext-2-raw/wiki.test.raw is not beside the checkout")
    data = tmp_path / "wiki.txt"
    data.write_text(text[:20000])
    out = tmp_path / "kld.json"
    assert _cli(["eval", "kld", str(smollm2_path), "--base", str(smollm2_path),
                 "--engine", "torch", "--dtype", "float32", "--kv-cache-dtype", "int8",
                 "--data", str(data), "--ctx", "512", "--max-windows", "2", "--json", str(out),
                 "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert r["kl_mean"] > 0  # the base really kept its float cache
    assert r["ppl"] == pytest.approx(r["ppl_base"], rel=0.01)
    assert r["same_top_rate"] > 0.95


# -- engine_fast's kernels on int8 caches (Triton's interpreter on CPU) ------------------------


def _int8_pair(num_blocks, block_size, hkv, d, seed):
    """Random K and V int8 caches (values spanning 1e-2 .. 1e2 across heads) and the float32
    caches they stand for."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.logspace(-2, 2, hkv)[:, None]
    pair = []
    for _ in range(2):
        x = torch.randn(num_blocks, block_size, hkv, d, generator=g) * mags
        codes, scales = quantize_kv(x)
        pair.append(Int8KVCache(codes.to(DEVICE), scales.to(DEVICE)))
    floats = [dequantize_kv(c.codes, c.scales, torch.float32) for c in pair]
    return pair, floats


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group,head_dim", [(1, 32), (4, 64)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention_on_int8_caches_equals_attention_on_their_values(dtype, group,
                                                                         head_dim, num_splits):
    hkv, block_size, ctx_lens = 2, 16, [1, 17, 40, 0, 100]
    (k8, v8), (kf, vf) = _int8_pair(32, block_size, hkv, head_dim, seed=group + head_dim)
    tables = random_tables(ctx_lens, block_size, 32, seed=head_dim)
    q = torch.randn(len(ctx_lens), hkv * group, head_dim).to(DEVICE, dtype) / 10
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    out = decode_attention(q, k8, v8, tables, ctx, head_dim ** -0.5, num_splits=num_splits,
                           block_n=32)
    ref = reference_attention(q, kf.to(dtype), vf.to(dtype), tables, ctx_lens,
                              [1] * len(ctx_lens), head_dim ** -0.5)
    scale = vf.abs().amax()  # outputs are mixtures of v rows up to 1e2
    torch.testing.assert_close(out.float() / scale, ref / scale, atol=TOL[dtype],
                               rtol=TOL[dtype])


@pytest.mark.parametrize("window", [0, 21])
def test_prefill_attention_on_int8_caches_equals_attention_on_their_values(window):
    hkv, group, head_dim, block_size = 2, 2, 32, 16
    q_lens, ctx_lens = [70, 1, 53], [70, 9, 83]  # whole prompt, decode row, cached prefix
    (k8, v8), (kf, vf) = _int8_pair(24, block_size, hkv, head_dim, seed=11)
    tables = random_tables(ctx_lens, block_size, 24, seed=12)
    q = torch.randn(sum(q_lens), hkv * group, head_dim).to(DEVICE) / 10
    qsl = torch.tensor([0, 70, 71, 124], dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    out = prefill_attention(q, k8, v8, tables, qsl, ctx, q_lens, 0.2, window or None,
                            block_m=16, block_n=16)
    ref = reference_attention(q, kf, vf, tables, ctx_lens, q_lens, 0.2, window)
    torch.testing.assert_close(out, ref, atol=1e-4 * vf.abs().amax().item(), rtol=1e-4)


def _assert_codes_of(cache: Int8KVCache, slots: torch.Tensor, expected: torch.Tensor):
    """The int8 rows at ``slots`` are ``quantize_kv(expected)``: scales to float32 rounding,
    codes within one step (the kernels round halves away from zero, torch to even)."""
    hkv, d = cache.codes.shape[2:]
    codes = cache.codes.view(-1, hkv, d)[slots]
    scales = cache.scales.view(-1, hkv)[slots]
    ref_codes, ref_scales = quantize_kv(expected)
    torch.testing.assert_close(scales, ref_scales, rtol=1e-5, atol=0)
    assert (codes.int() - ref_codes.int()).abs().max() <= 1


def test_rotary_and_write_kv_stores_int8_codes_and_scales():
    from engine_torch.layers import apply_rotary, rotary_cos_sin

    hkv, head_dim, T = 2, 32, 5
    g = torch.Generator().manual_seed(3)
    q = torch.randn(T, 4, head_dim, generator=g).to(DEVICE)
    k = torch.randn(T, hkv, head_dim, generator=g).to(DEVICE) * 30
    v = torch.randn(T, hkv, head_dim, generator=g).to(DEVICE) * 0.01
    positions = torch.tensor([0, 1, 17, 1000, 3], device=DEVICE)
    slots = torch.tensor([5, 63, 16, 0, -1], device=DEVICE)  # last: padding row
    inv_freq = (1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))).to(DEVICE)
    cos, sin = rotary_cos_sin(positions, inv_freq, torch.float32)
    k_rot = apply_rotary(k, cos, sin)
    caches = [Int8KVCache(torch.full((4, 16, hkv, head_dim), 55, dtype=torch.int8,
                                     device=DEVICE),
                          torch.full((4, 16, hkv), -1.0, device=DEVICE)) for _ in range(2)]
    rotary_and_write_kv(q, k, v, positions, inv_freq, caches[0], caches[1], slots)
    written = slots[:-1]
    _assert_codes_of(caches[0], written, k_rot[:-1])
    _assert_codes_of(caches[1], written, v[:-1])
    untouched = torch.ones(64, dtype=torch.bool, device=DEVICE)
    untouched[written] = False
    for c in caches:
        assert (c.codes.view(64, -1)[untouched] == 55).all()
        assert (c.scales.view(64, -1)[untouched] == -1).all()


@pytest.mark.parametrize("num_splits", [1, 3])
def test_fused_decode_step_writes_the_int8_rows_the_rotary_kernel_writes(num_splits):
    hkv, group, head_dim, block_size = 2, 4, 32, 16
    ctx_lens = [1, 17, 40, 0]
    (k8, v8), _ = _int8_pair(16, block_size, hkv, head_dim, seed=5)
    tables = random_tables(ctx_lens, block_size, 16, seed=6)
    B, H = len(ctx_lens), hkv * group
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, head_dim, generator=g).to(DEVICE)
    k = torch.randn(B, hkv, head_dim, generator=g).to(DEVICE)
    v = torch.randn(B, hkv, head_dim, generator=g).to(DEVICE)
    positions = torch.tensor([max(c - 1, 0) for c in ctx_lens], device=DEVICE)
    slots = torch.tensor([int(tables[b, (c - 1) // block_size]) * block_size
                          + (c - 1) % block_size if c else -1
                          for b, c in enumerate(ctx_lens)], device=DEVICE)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))).to(DEVICE)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    fused = [Int8KVCache(c.codes.clone(), c.scales.clone()) for c in (k8, v8)]
    out = decode_attention(q, *fused, tables, ctx, 0.2, num_splits=num_splits, block_n=32,
                           new_kv=NewKV(k, v, positions, inv_freq, slots))
    q2 = q.clone()
    rotary_and_write_kv(q2, k, v, positions, inv_freq, k8, v8, slots)
    ref = decode_attention(q2, k8, v8, tables, ctx, 0.2, num_splits=num_splits, block_n=32)
    for a, b in zip(fused, (k8, v8)):
        torch.testing.assert_close(a.scales, b.scales, rtol=1e-5, atol=0)
        assert (a.codes.int() - b.codes.int()).abs().max() <= 1
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)  # a code step apart at most


@pytest.mark.parametrize("chunk", [5, 64])
def test_engine_fast_with_int8_kv_computes_what_engine_torch_computes(tiny_model_factory,
                                                                      chunk):
    path = tiny_model_factory("llama")
    decode = [[1, 2, 3], [6, 7, 8]]
    torch_int8 = collect_logits(path, PROMPTS, chunk, decode, kv_cache_dtype="int8")
    fast_int8 = collect_logits(path, PROMPTS, chunk, decode, engine="fast",
                               kv_cache_dtype="int8")
    for a, b in zip(fast_int8, torch_int8):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())
