"""The offline API, shaped like vLLM's: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from twinfer.config import CacheConfig, EngineConfig, SchedulerConfig, parse_dtype, resolve_device
from twinfer.dummy import dummy_hf_config, dummy_tokenizer, dummy_weights
from twinfer.engine import LLMEngine
from twinfer.models import resolve_model, twinfer_home
from twinfer.online_quant import quantize_weights_rtn
from twinfer.outputs import RequestOutput
from twinfer.quant import QuantScheme
from twinfer.registry import resolve_engine
from twinfer.sampling import SamplingParams
from twinfer.tokenizer import Tokenizer
from twinfer.weights import load_weights

Prompt = str | list[int]


class LLM:
    """Load a model once and generate from it.

    Args:
        model: a built-in name (``smollm2-135m``), a Hugging Face directory or a GGUF file.
        engine: "torch" (reference), "fast" (Triton) or "auto" (fast on CUDA when available).
        dtype: "auto" (float32 on CPU, float16 on CUDA), "float32", "float16", "bfloat16".
        device: "auto", "cpu", "cuda" or "cuda:N".
        max_model_len: longest prompt + output in tokens (default: the model's own limit).
        num_kv_blocks: fix the KV cache size instead of deriving it from the memory budget.
        load_format: "auto" reads the checkpoint; "dummy" makes random weights in the shapes
            of ``model`` (a preset such as ``llama-3.1-8b``, or a directory's config.json),
            for measuring speed without the checkpoint.
        quantization: RTN-quantize a dense model while loading it (``w4a16``, ``w4a16-g64``,
            ``w8a16``, ``w8a8``; see ``QuantScheme.parse``).
        async_scheduling: schedule step n + 1 while step n runs on the device (default: on
            for CUDA, where it hides the host's per-step work; off on CPU, where there is
            nothing to overlap).
        kv_cache_dtype: "auto" keeps K and V in the model dtype; "int8" stores them as int8
            with one scale per token and KV head (0.52 of fp16's bytes at head_dim 128, so
            ~1.9x the tokens in the same budget), "int4" as 4-bit codes with a scale and
            minimum per token and head (0.28), "k8v4" keys in int8 and values in int4 (0.40);
            both engines.
    """

    def __init__(self, model: str | Path, engine: str = "auto", dtype: str = "auto",
                 device: str = "auto", max_num_seqs: int = 256,
                 max_model_len: int | None = None, max_num_batched_tokens: int | None = None,
                 num_kv_blocks: int | None = None, enable_prefix_caching: bool = True,
                 block_size: int = 16, gpu_memory_utilization: float = 0.9,
                 cpu_kv_cache_bytes: int = 1 << 30, download_dir: str | Path | None = None,
                 load_format: str = "auto", quantization: str | None = None,
                 async_scheduling: bool | None = None, kv_cache_dtype: str = "auto"):
        home = Path(download_dir) if download_dir else twinfer_home()
        device = resolve_device(device)
        engine = resolve_engine(engine, device)
        torch_dtype = parse_dtype(dtype, device)
        if load_format == "dummy":
            path = Path(str(model))
            weights = dummy_weights(dummy_hf_config(model), torch_dtype, device)
            tokenizer = dummy_tokenizer(model, weights.config)
        elif load_format == "auto":
            path = resolve_model(model, home)
            weights = load_weights(path)
            tokenizer = Tokenizer.load(path, weights.config.eos_token_ids, cache_dir=home)
        else:
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
        if quantization:
            weights = quantize_weights_rtn(weights, QuantScheme.parse(quantization))
        model_cfg = weights.config
        max_len = max_model_len or model_cfg.max_position_embeddings
        if max_len > model_cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {max_len} exceeds the model's "
                             f"max_position_embeddings {model_cfg.max_position_embeddings}")
        config = EngineConfig(
            model=model_cfg,
            cache=CacheConfig(block_size=block_size, num_kv_blocks=num_kv_blocks,
                              gpu_memory_utilization=gpu_memory_utilization,
                              cpu_kv_cache_bytes=cpu_kv_cache_bytes,
                              enable_prefix_caching=enable_prefix_caching,
                              kv_cache_dtype=kv_cache_dtype),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens or max(2048, max_num_seqs),
                max_model_len=max_len),
            engine=engine, device=device, dtype=torch_dtype,
            async_scheduling=(device.startswith("cuda") if async_scheduling is None
                              else async_scheduling))
        self.model_path = path
        self.engine = LLMEngine(config, weights, tokenizer)
        self.tokenizer = tokenizer
        self._ids = itertools.count()

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order.

        ``prompts`` is a string, a list of strings, a list of token ids, or a list of
        token-id lists. Every prompt is checked before any runs.
        """
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        encoded = [self.engine.encode_prompt(p) for p in prompts]  # fail before queueing
        ids = []
        try:
            for p, token_ids, sp in zip(prompts, encoded, params):
                ids.append(f"gen-{next(self._ids)}")
                self.engine.add_request(ids[-1], token_ids, sp,
                                        prompt_text=p if isinstance(p, str) else None)
            finished = self._run(set(ids), use_tqdm)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return [finished[rid] for rid in ids]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, via the chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode_chat(c) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None
               ) -> Iterator[RequestOutput]:
        """Yield the request's cumulative output after every step that adds a token."""
        rid = f"stream-{next(self._ids)}"
        self.engine.add_request(rid, prompt, sampling_params)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)

    def _run(self, pending: set[str], use_tqdm: bool) -> dict[str, RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(pending), disable=not use_tqdm, desc="requests") as bar:
            while len(finished) < len(pending):
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError("requests vanished from the engine before finishing")
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        finished[out.request_id] = out
                        bar.update(1)
        return finished


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("no prompts given")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]
        return list(prompts)
    raise ValueError(f"prompts must be a string, token ids or a list of them, got "
                     f"{type(prompts).__name__}")


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return params
