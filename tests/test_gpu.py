"""engine_torch on CUDA: fp32 parity with transformers, fp16/bf16 close to fp32, and the
scheduler paths (preemption, seeds) on the device. Run with ``pytest -m gpu``."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import TINY_VOCAB, collect_logits

from twinfer import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3"]
# Half-precision tolerance on logits of the tiny models (|logits| ~ 0.5): fp16 keeps 11 bits
# of mantissa, bf16 8, accumulated over 2 layers.
HALF_ATOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2}


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must mean fp32 for parity
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, TINY_VOCAB) for _ in range(n)] for n in (1, 17, 45)]


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_fp32_logits_match_transformers(tiny_model_factory, arch):
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory(arch)
    ps = prompts(1)
    ours = collect_logits(path, ps, chunk=16, device="cuda")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
    for p, o in zip(ps, ours):
        with torch.no_grad():
            ref = hf(torch.tensor([p], device="cuda")).logits[0].cpu()
        torch.testing.assert_close(o, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_half_precision_logits_are_close_to_fp32(tiny_model_factory, arch, dtype):
    path = tiny_model_factory(arch)
    ps = prompts(2)
    ref = collect_logits(path, ps, chunk=2048, device="cpu")
    ours = collect_logits(path, ps, chunk=7, dtype=dtype, device="cuda")
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, atol=HALF_ATOL[dtype], rtol=0)


def test_cuda_preempted_batch_matches_cpu(tiny_model_factory):
    path = tiny_model_factory("llama", seed=7, logit_scale=30.0)
    rng = random.Random(0)
    reqs = [([rng.randrange(2, TINY_VOCAB) for _ in range(rng.randint(1, 60))],
             rng.randint(1, 40)) for _ in range(64)]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in reqs]
    gpu = LLM(path, engine="torch", device="cuda", dtype="float32", num_kv_blocks=16,
              max_model_len=128, max_num_seqs=64, enable_prefix_caching=False)
    cpu = LLM(path, engine="torch", device="cpu", num_kv_blocks=512, max_model_len=128)
    got = gpu.generate([p for p, _ in reqs], params)
    want = cpu.generate([p for p, _ in reqs], params)
    assert gpu.engine.scheduler.num_preemptions > 0
    assert gpu.engine.block_manager.num_used_blocks == 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


def test_cuda_seeded_request_is_the_same_alone_and_in_a_batch(tiny_model_factory):
    llm = LLM(tiny_model_factory("llama"), engine="torch", device="cuda", dtype="float16",
              num_kv_blocks=256, max_model_len=256)
    seeded = SamplingParams(temperature=1.0, seed=99, max_tokens=24, ignore_eos=True)
    alone = llm.generate([[5, 6, 7, 8]], seeded)[0].outputs[0].token_ids
    others = [[i + 2] * (i + 1) for i in range(16)]
    outs = llm.generate(others + [[5, 6, 7, 8]],
                        [SamplingParams(temperature=1.0, max_tokens=20)] * 16 + [seeded])
    assert outs[-1].outputs[0].token_ids == alone


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_fast_engine_with_graphs_matches_torch_engine_under_preemption(
        tiny_model_factory, dtype):
    path = tiny_model_factory("llama", seed=7, logit_scale=30.0)
    rng = random.Random(1)
    reqs = [([rng.randrange(2, TINY_VOCAB) for _ in range(rng.randint(1, 60))],
             rng.randint(1, 40)) for _ in range(64)]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in reqs]
    fast = LLM(path, engine="fast", device="cuda", dtype=dtype, num_kv_blocks=16,
               max_model_len=128, max_num_seqs=64, enable_prefix_caching=False)
    assert fast.engine.runner.graphs, "decode graphs were not captured"
    ref = LLM(path, engine="torch", device="cuda", dtype=dtype, num_kv_blocks=512,
              max_model_len=128)
    got = fast.generate([p for p, _ in reqs], params)
    want = ref.generate([p for p, _ in reqs], params)
    assert fast.engine.scheduler.num_preemptions > 0
    assert fast.engine.block_manager.num_used_blocks == 0
    if dtype == "float16":
        same = sum(g.outputs[0].token_ids == w.outputs[0].token_ids for g, w in zip(got, want))
        assert same >= 62, f"only {same}/64 requests agree"
    else:
        # bf16 keeps 8 mantissa bits; the engines round at different points (fused residual
        # + norm, fp32 rotary), so long greedy trajectories drift apart (55/64 whole
        # sequences agreed on an H100). The first token, before any drift, must agree.
        first = sum(g.outputs[0].token_ids[0] == w.outputs[0].token_ids[0]
                    for g, w in zip(got, want))
        assert first >= 62, f"only {first}/64 first tokens agree"


def test_cuda_gpu_memory_utilization_sizes_the_cache(tiny_model_factory):
    llm = LLM(tiny_model_factory("llama"), engine="torch", device="cuda", dtype="float16",
              gpu_memory_utilization=0.3, max_model_len=256)
    free, total = torch.cuda.mem_get_info()
    used_fraction = 1 - free / total
    assert llm.engine.block_manager.num_blocks > 1000
    assert used_fraction < 0.35
