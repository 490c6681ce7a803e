"""The int8 KV cache (``kv_cache_dtype="int8"``): per-token, per-head symmetric codes that halve
the cache's bytes, read back dequantized by engine_torch; what it costs in accuracy."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import collect_logits

from engine_torch.attention import _gather, write_kv_cache
from twinfer import LLM, SamplingParams
from twinfer.config import CacheConfig, EngineConfig, SchedulerConfig
from twinfer.kv_cache_memory import (
    Int8KVCache,
    allocate_kv_caches,
    dequantize_kv,
    determine_num_kv_blocks,
    kv_block_bytes,
    quantize_kv,
)
from twinfer.registry import create_runner
from twinfer.weights import load_weights

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


def test_engine_fast_refuses_an_int8_cache_naming_the_torch_engine(tiny_model_factory):
    weights = load_weights(tiny_model_factory("llama"))
    cfg = EngineConfig(model=weights.config, cache=CacheConfig(kv_cache_dtype="int8"),
                       scheduler=SchedulerConfig(), engine="fast")
    with pytest.raises(ValueError, match="kv_cache_dtype 'int8'.*engine 'torch'"):
        create_runner(cfg, weights)


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
