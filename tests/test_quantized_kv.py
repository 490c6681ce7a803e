"""Quantized KV caches (``kv_cache_dtype="int8"`` / ``"int4"``): per-token, per-head codes that
shrink the cache, written and read back dequantized by both engines; what they cost."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
import triton
import triton.language as tl
from conftest import collect_logits, newest_token_slots, random_tables, reference_attention

from engine_torch.attention import _gather, write_kv_cache
from twinfer import LLM, SamplingParams
from twinfer.config import CacheConfig
from twinfer.kv_cache_memory import (
    Int4KVCache,
    Int8KVCache,
    allocate_kv_caches,
    dequantize_kv,
    dequantize_kv_int4,
    determine_num_kv_blocks,
    hadamard,
    kv_block_bytes,
    quantize_kv,
    quantize_kv_int4,
)
from twinfer.weights import load_weights
from twinfer_kernels.decode_attention import NewKV, decode_attention
from twinfer_kernels.prefill_attention import prefill_attention
from twinfer_kernels.quantized_kv import fwht_rows
from twinfer_kernels.rotary_kv import rotary_and_write_kv

PROMPTS = [[0, 5, 9, 33, 7, 100, 200, 3, 4, 8, 19, 40, 41, 42, 43, 44, 45, 46, 47, 48],
           [0, 17, 250, 11]]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3}  # as tests/test_kernels.py states them
KINDS = ["int8", "int4"]  # one cache's format
# kv_cache_dtype -> (keys' format, values' format)
PAIRS = {"int8": ("int8", "int8"), "int4": ("int4", "int4"), "k8v4": ("int8", "int4")}


def quantized(x: torch.Tensor, kind: str, rotated: bool = False) -> Int8KVCache | Int4KVCache:
    """x [..., D] as a quantized cache of ``kind`` (the torch reference quantizers); int4
    ``rotated``: stored as x H, as the engines keep keys."""
    if kind == "int8":
        return Int8KVCache(*quantize_kv(x))
    if rotated:
        x = x.float() @ hadamard(x.shape[-1], x.device)
    return Int4KVCache(*quantize_kv_int4(x), rotated=rotated)


def mapped(cache, fn):
    """``cache`` with ``fn`` applied to each of its tensors."""
    return dataclasses.replace(cache, **{f.name: fn(getattr(cache, f.name))
                                         for f in dataclasses.fields(cache)
                                         if isinstance(getattr(cache, f.name), torch.Tensor)})


def values(cache: Int8KVCache | Int4KVCache) -> torch.Tensor:
    """Every row of ``cache``, dequantized (and rotated back) in float32."""
    if isinstance(cache, Int8KVCache):
        return dequantize_kv(cache.codes, cache.scales, torch.float32)
    x = dequantize_kv_int4(cache.codes, cache.scales, cache.mins, torch.float32)
    return x @ hadamard(x.shape[-1], x.device) if cache.rotated else x


def codes(cache: Int8KVCache | Int4KVCache) -> torch.Tensor:
    """Every row's codes as int32 [..., D] (int4 unpacked)."""
    if isinstance(cache, Int8KVCache):
        return cache.codes.int()
    return torch.cat([cache.codes & 15, cache.codes >> 4], -1).int()


def empty_cache(kind: str, blocks: int, block_size: int, hkv: int, d: int, fill: int = 99,
                rotated: bool = False, device: str = DEVICE):
    """A cache of poisoned codes and NaN parameters."""
    nan = torch.full((blocks, block_size, hkv), float("nan"), device=device)
    if kind == "int8":
        return Int8KVCache(torch.full((blocks, block_size, hkv, d), fill, dtype=torch.int8,
                                      device=device), nan)
    return Int4KVCache(torch.full((blocks, block_size, hkv, d // 2), fill, dtype=torch.uint8,
                                  device=device), nan, nan.clone(), rotated=rotated)


# -- the reference quantizers and the memory they save ----------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("head_dim", [2, 64, 80])
def test_quantized_kv_round_trip_error_is_at_most_half_a_step(kind, head_dim):
    # vectors whose sizes differ by orders of magnitude, as keys across heads do
    g = torch.Generator().manual_seed(head_dim)
    x = torch.randn(7, 5, head_dim, generator=g) * torch.logspace(-3, 3, 5)[:, None] + 0.3
    cache = quantized(x, kind)
    c = codes(cache)
    if kind == "int8":
        assert c.abs().amax(-1).eq(127).all()  # each vector uses the whole range
    else:
        assert c.amin(-1).eq(0).all() and c.amax(-1).eq(15).all()
    err = (values(cache) - x).abs()
    assert (err <= cache.scales[..., None] * 0.5 * (1 + 1e-5) + 1e-6).all()


@pytest.mark.parametrize("kind", KINDS)
def test_constant_and_zero_vectors_come_back_exactly(kind):
    x = torch.zeros(2, 3, 8)
    x[1] = 0.25
    assert torch.equal(values(quantized(x, kind)), x)


@pytest.mark.parametrize("kind,fraction", [("int8", 0.5), ("int4", 0.25), ("k8v4", 0.375)])
def test_quantized_block_takes_its_fraction_of_fp16_plus_row_parameters(tiny_model_factory,
                                                                         kind, fraction):
    cfg = load_weights(tiny_model_factory("llama")).config
    fp16 = kv_block_bytes(cfg, 16, torch.float16)
    params = {"int8": 4, "int4": 8, "k8v4": 6}[kind]  # float32 scale (and minimum) per row
    rows = 2 * cfg.num_layers * 16 * cfg.num_kv_heads
    assert kv_block_bytes(cfg, 16, torch.float16, kind) == fp16 * fraction + rows * params


def test_quantized_caches_fit_more_blocks_in_the_same_budget(tiny_model_factory):
    cfg = load_weights(tiny_model_factory("llama")).config
    budget = 1 << 20

    def blocks(kv_dtype: str) -> int:
        return determine_num_kv_blocks(cfg, CacheConfig(cpu_kv_cache_bytes=budget,
                                                        kv_cache_dtype=kv_dtype),
                                       torch.float32, "cpu")

    for kind in PAIRS:
        assert blocks(kind) == budget // kv_block_bytes(cfg, 16, torch.float32, kind)
    assert blocks("int4") > blocks("k8v4") > blocks("int8") > 3 * blocks("auto")


@pytest.mark.parametrize("kind", list(PAIRS))
def test_allocated_caches_take_the_bytes_the_budget_counts(tiny_model_factory, kind):
    cfg = load_weights(tiny_model_factory("llama")).config
    caches = allocate_kv_caches(cfg, 5, 16, torch.float16, "cpu", kind)
    total = sum(t.nbytes for pair in caches for c in pair for t in c.tensors())
    assert total == 5 * kv_block_bytes(cfg, 16, torch.float16, kind)


def test_unknown_kv_cache_dtype_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="must be one of auto, int8, int4, k8v4, got 'fp8'"):
        CacheConfig(kv_cache_dtype="fp8")


# -- engine_torch -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,rotated", [("int8", False), ("int4", False), ("int4", True)])
def test_written_slots_read_back_as_their_dequantized_values(kind, rotated):
    g = torch.Generator().manual_seed(0)
    blocks, bs, hkv, d = 4, 4, 2, 8
    k_cache = empty_cache(kind, blocks, bs, hkv, d, rotated=rotated, device="cpu")
    v_cache = empty_cache(kind, blocks, bs, hkv, d, device="cpu")
    k, v = torch.randn(6, hkv, d, generator=g), torch.randn(6, hkv, d, generator=g)
    slots = torch.tensor([8, 9, 10, 11, 0, 1])  # block 2, then block 0
    write_kv_cache(k, v, k_cache, v_cache, slots)
    got_k, got_v = _gather(k_cache, v_cache, torch.tensor([[2, 0]]), 6, torch.float32)
    torch.testing.assert_close(got_k[0], values(quantized(k, kind, rotated)))
    torch.testing.assert_close(got_v[0], values(quantized(v, kind)))


def test_int4_keys_are_stored_in_the_hadamard_basis_and_read_back_in_their_own():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(5, 2, 16, generator=g)
    k[..., 3] *= 50  # one outlier channel, as keys have
    plain, rotated = (empty_cache("int4", 2, 4, 2, 16, rotated=r, device="cpu")
                      for r in (False, True))
    for cache in (plain, rotated):
        cache.store(torch.arange(5), k)
    stored = dequantize_kv_int4(rotated.codes, rotated.scales, rotated.mins, torch.float32)
    torch.testing.assert_close(stored.view(-1, 2, 16)[:5], k @ hadamard(16), atol=2.0, rtol=0)
    err = {name: (c.gather(torch.arange(2), torch.float32).view(-1, 2, 16)[:5] - k).norm()
           for name, c in (("plain", plain), ("rotated", rotated))}
    assert err["rotated"] < 0.5 * err["plain"]  # the outlier no longer sets every step


@pytest.mark.parametrize("kind,tol", [("int8", 0.02), ("int4", 0.15), ("k8v4", 0.1)])
@pytest.mark.parametrize("chunk", [3, 64])  # chunked prefill reads keys it wrote earlier
def test_engine_torch_with_a_quantized_cache_stays_close_to_the_model_dtype_cache(
        tiny_model_factory, kind, tol, chunk):
    path = tiny_model_factory("llama")
    decode = [[1, 2, 3, 4, 5], [6, 7, 8]]
    exact = collect_logits(path, PROMPTS, chunk, decode)
    approx = collect_logits(path, PROMPTS, chunk, decode, kv_cache_dtype=kind)
    for a, b in zip(approx, exact):
        assert not torch.equal(a, b)  # the codes, not the float values, were read
        # the logits move by about the codes' step relative to each row's range
        assert (a - b).norm() <= tol * b.norm()


@pytest.mark.parametrize("kind", list(PAIRS))
def test_quantized_cache_returns_every_block_after_generation(tiny_model_factory, kind):
    llm = LLM(str(tiny_model_factory("llama")), engine="torch", dtype="float32",
              max_model_len=128, num_kv_blocks=32, kv_cache_dtype=kind)
    outs = llm.generate([[0, 5, 9, 33], [0, 17, 250]], SamplingParams(max_tokens=20,
                                                                       ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outs] == [20, 20]
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks == 32


# -- engine_fast's kernels (Triton's interpreter on CPU) ---------------------------------------


def _pair(kind, num_blocks, block_size, hkv, d, seed):
    """Random K and V caches of kv_cache_dtype ``kind`` (values spanning 1e-2 .. 1e2 across
    heads, off centre; int4 keys in the Hadamard basis, as the engines keep them) and the
    float32 caches they stand for."""
    g = torch.Generator().manual_seed(seed)
    mags = torch.logspace(-2, 2, hkv)[:, None]
    pair = []
    for part, keys in zip(PAIRS[kind], (True, False)):
        x = (torch.randn(num_blocks, block_size, hkv, d, generator=g) + 0.5) * mags
        pair.append(mapped(quantized(x, part, rotated=keys and part == "int4"),
                           lambda t: t.to(DEVICE)))
    return pair, [values(c) for c in pair]


def _kernel_queries(q: torch.Tensor, kind: str) -> torch.Tensor:
    """q as the attention kernels take it: in the Hadamard basis when int4 keys are."""
    if PAIRS[kind][0] != "int4":
        return q
    return (q.float() @ hadamard(q.shape[-1], q.device)).to(q.dtype)


@triton.jit
def _fwht_kernel(x_ptr, out_ptr, M: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    tl.store(out_ptr + offs, fwht_rows(tl.load(x_ptr + offs)))


@pytest.mark.parametrize("rows,width", [(2, 2), (16, 16), (4, 128), (16, 64)])
def test_fwht_rows_is_the_unnormalised_hadamard_transform(rows, width):
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(width)).to(DEVICE)
    out = torch.empty_like(x)
    _fwht_kernel[(1,)](x, out, rows, width)
    expected = x @ (hadamard(width, DEVICE) * width ** 0.5)
    torch.testing.assert_close(out, expected, atol=1e-4 * width ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group,head_dim", [(1, 32), (4, 64)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention_on_quantized_caches_equals_attention_on_their_values(
        kind, dtype, group, head_dim, num_splits):
    hkv, block_size, ctx_lens = 2, 16, [1, 17, 40, 0, 100]
    (kq, vq), (kf, vf) = _pair(kind, 32, block_size, hkv, head_dim, seed=group + head_dim)
    tables = random_tables(ctx_lens, block_size, 32, seed=head_dim)
    q = torch.randn(len(ctx_lens), hkv * group, head_dim).to(DEVICE, dtype) / 10
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    out = decode_attention(_kernel_queries(q, kind), kq, vq, tables, ctx, head_dim ** -0.5,
                           num_splits=num_splits, block_n=32)
    ref = reference_attention(q, kf.to(dtype), vf.to(dtype), tables, ctx_lens,
                              [1] * len(ctx_lens), head_dim ** -0.5)
    scale = vf.abs().amax()  # outputs are mixtures of v rows up to ~1e2
    torch.testing.assert_close(out.float() / scale, ref / scale, atol=TOL[dtype],
                               rtol=TOL[dtype])


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("window", [0, 21])
def test_prefill_attention_on_quantized_caches_equals_attention_on_their_values(kind, window):
    hkv, group, head_dim, block_size = 2, 2, 32, 16
    q_lens, ctx_lens = [70, 1, 53], [70, 9, 83]  # whole prompt, decode row, cached prefix
    (kq, vq), (kf, vf) = _pair(kind, 24, block_size, hkv, head_dim, seed=11)
    tables = random_tables(ctx_lens, block_size, 24, seed=12)
    q = torch.randn(sum(q_lens), hkv * group, head_dim).to(DEVICE) / 10
    qsl = torch.tensor([0, 70, 71, 124], dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    out = prefill_attention(_kernel_queries(q, kind), kq, vq, tables, qsl, ctx, q_lens, 0.2,
                            window or None, block_m=16, block_n=16)
    ref = reference_attention(q, kf, vf, tables, ctx_lens, q_lens, 0.2, window)
    torch.testing.assert_close(out, ref, atol=1e-4 * vf.abs().amax().item(), rtol=1e-4)


def _assert_rows_quantize(cache, slots: torch.Tensor, expected: torch.Tensor):
    """The rows at ``slots`` are the reference quantization of ``expected``: parameters to
    float32 rounding, codes within one step (the kernels round halves away from zero, torch
    to even)."""
    kind = "int8" if isinstance(cache, Int8KVCache) else "int4"
    hkv = cache.codes.shape[2]
    ref = quantized(expected, kind, rotated=kind == "int4" and cache.rotated)
    for name in ("scales", "mins") if kind == "int4" else ("scales",):
        torch.testing.assert_close(getattr(cache, name).view(-1, hkv)[slots],
                                   getattr(ref, name), rtol=1e-5, atol=1e-5)
    got = codes(cache).view(-1, hkv, expected.shape[-1])[slots]
    assert (got - codes(ref)).abs().max() <= 1


@pytest.mark.parametrize("kind", list(PAIRS))
def test_rotary_and_write_kv_stores_codes_and_parameters(kind):
    from engine_torch.layers import apply_rotary, rotary_cos_sin

    hkv, head_dim, T = 2, 32, 5
    g = torch.Generator().manual_seed(3)
    q = torch.randn(T, 4, head_dim, generator=g).to(DEVICE)
    k = torch.randn(T, hkv, head_dim, generator=g).to(DEVICE) * 30
    v = torch.randn(T, hkv, head_dim, generator=g).to(DEVICE) * 0.01 + 0.02
    positions = torch.tensor([0, 1, 17, 1000, 3], device=DEVICE)
    slots = torch.tensor([5, 63, 16, 0, -1], device=DEVICE)  # last: padding row
    inv_freq = (1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))).to(DEVICE)
    cos, sin = rotary_cos_sin(positions, inv_freq, torch.float32)
    k_rot = apply_rotary(k, cos, sin)
    k_kind, v_kind = PAIRS[kind]
    k_cache = empty_cache(k_kind, 4, 16, hkv, head_dim, fill=55, rotated=k_kind == "int4")
    v_cache = empty_cache(v_kind, 4, 16, hkv, head_dim, fill=55)
    q_rot = _kernel_queries(apply_rotary(q, cos, sin), kind)
    rotary_and_write_kv(q, k, v, positions, inv_freq, k_cache, v_cache, slots)
    torch.testing.assert_close(q, q_rot, atol=1e-4, rtol=1e-4)  # in place, as attention wants it
    written = slots[:-1]
    _assert_rows_quantize(k_cache, written, k_rot[:-1])
    _assert_rows_quantize(v_cache, written, v[:-1])
    untouched = torch.ones(64, dtype=torch.bool, device=DEVICE)
    untouched[written] = False
    for c in (k_cache, v_cache):
        assert (c.codes.view(64, -1)[untouched] == 55).all()
        assert c.scales.view(64, -1)[untouched].isnan().all()


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fused_decode_step_writes_the_rows_the_rotary_kernel_writes(kind, num_splits):
    hkv, group, head_dim, block_size = 2, 4, 32, 16
    ctx_lens = [1, 17, 40, 0]
    (kq, vq), _ = _pair(kind, 16, block_size, hkv, head_dim, seed=5)
    tables = random_tables(ctx_lens, block_size, 16, seed=6)
    B, H = len(ctx_lens), hkv * group
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, head_dim, generator=g).to(DEVICE)
    k = torch.randn(B, hkv, head_dim, generator=g).to(DEVICE)
    v = torch.randn(B, hkv, head_dim, generator=g).to(DEVICE)
    positions = torch.tensor([max(c - 1, 0) for c in ctx_lens], device=DEVICE)
    slots = newest_token_slots(tables, ctx_lens, block_size)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))).to(DEVICE)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE)
    fused = [mapped(c, torch.clone) for c in (kq, vq)]
    out = decode_attention(q, *fused, tables, ctx, 0.2, num_splits=num_splits, block_n=32,
                           new_kv=NewKV(k, v, positions, inv_freq, slots))
    q2 = q.clone()
    rotary_and_write_kv(q2, k, v, positions, inv_freq, kq, vq, slots)
    ref = decode_attention(q2, kq, vq, tables, ctx, 0.2, num_splits=num_splits, block_n=32)
    for a, b in zip(fused, (kq, vq)):
        for t, u in zip(a.tensors()[1:], b.tensors()[1:]):  # scales (and minima)
            torch.testing.assert_close(t, u, rtol=1e-5, atol=1e-5)
        assert (codes(a) - codes(b)).abs().max() <= 1
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.1)  # a code step apart at most


@pytest.mark.parametrize("kind", list(PAIRS))
@pytest.mark.parametrize("chunk", [5, 64])
def test_engine_fast_with_a_quantized_cache_computes_what_engine_torch_computes(
        tiny_model_factory, kind, chunk):
    path = tiny_model_factory("llama")
    decode = [[1, 2, 3], [6, 7, 8]]
    by_torch = collect_logits(path, PROMPTS, chunk, decode, kv_cache_dtype=kind)
    by_fast = collect_logits(path, PROMPTS, chunk, decode, engine="fast", device=DEVICE,
                             kv_cache_dtype=kind)
    for a, b in zip(by_fast, by_torch):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())


# -- the real model ---------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    from twinfer import cli_eval

    parser = argparse.ArgumentParser()
    cli_eval.register(parser.add_subparsers(dest="command"))
    return cli_eval.run(parser.parse_args(argv))


@pytest.mark.slow
@pytest.mark.parametrize("kind,max_ppl_ratio,min_same_top", [("int8", 1.01, 0.95),
                                                             ("int4", 1.05, 0.85),
                                                             ("k8v4", 1.02, 0.93)])
def test_smollm2_quantized_kv_costs_little_perplexity(smollm2_path, tmp_path, kind,
                                                      max_ppl_ratio, min_same_top):
    # The real model on real text: the cache's damage measured as `twinfer eval kld` measures
    # it, against the same model with its cache in float32.
    from twinfer.eval_data import load_wikitext2

    try:
        text = load_wikitext2()
    except FileNotFoundError:
        pytest.skip("../shared/data/wikitext-2-raw/wiki.test.raw is not beside the checkout")
    data = tmp_path / "wiki.txt"
    data.write_text(text[:20000])
    out = tmp_path / "kld.json"
    assert _cli(["eval", "kld", str(smollm2_path), "--base", str(smollm2_path),
                 "--engine", "torch", "--dtype", "float32", "--kv-cache-dtype", kind,
                 "--data", str(data), "--ctx", "512", "--max-windows", "2", "--json", str(out),
                 "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert r["kl_mean"] > 0  # the base really kept its float cache
    assert r["ppl"] / r["ppl_base"] <= max_ppl_ratio
    assert r["same_top_rate"] > min_same_top
