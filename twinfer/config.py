"""Configuration dataclasses, one per concern, validated once in ``__post_init__``.

``ModelConfig`` describes the network (read from a Hugging Face ``config.json`` or GGUF
metadata); ``CacheConfig`` the paged KV cache; ``SchedulerConfig`` the batching limits;
``EngineConfig`` ties them together with the user's choice of engine, device and dtype.
None of them is mutated after it is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """Map a user dtype ("auto", "fp16", torch.bfloat16, ...) to a torch dtype.

    "auto" is float32 on CPU (half-precision matmuls are slow there) and float16 on CUDA.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling: "default", "linear" or Llama 3.1's "llama3"."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "linear", "llama3"):
            raise ValueError(
                f"rope scaling type {self.rope_type!r} is not supported (default, linear, llama3)"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Shape and switches of a Llama-family decoder; one definition covers every architecture."""

    architecture: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 / Qwen2.5
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before rotary
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model config field {name} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dictionary."""
        archs = cfg.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES),
                    None)
        if arch is None:
            raise ValueError(
                f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"twinfer supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # transformers 5 moved rope_theta and rope_scaling into "rope_parameters".
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(rope.get("factor", 1.0)),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", 8192)),
        )
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        num_heads = cfg["num_attention_heads"]
        sliding = cfg.get("sliding_window") if arch == "mistral" else None
        if arch in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
            sliding = cfg.get("sliding_window")
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch == "qwen3",
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


KV_CACHE_DTYPES = ("auto", "int8", "int4", "k8v4")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: block size and how many blocks (explicit, or from a memory budget)."""

    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9  # fraction of device memory for weights + KV on CUDA
    cpu_kv_cache_bytes: int = 1 << 30  # KV budget on CPU (zeroing it costs ~1.5 s per GiB)
    enable_prefix_caching: bool = True
    # "auto": K and V in the model dtype; "int8": int8 codes with one float32 scale per
    # token and KV head (twinfer.kv_cache_memory), about half the bytes of fp16; "int4": two
    # 4-bit codes a byte with a float32 scale and minimum per token and head, about 0.3;
    # "k8v4": keys int8, values int4 (the keys carry int4's error), about 0.4.
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError("block_size must be positive")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError("num_kv_blocks must be positive")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.cpu_kv_cache_bytes <= 0:
            raise ValueError("cpu_kv_cache_bytes must be positive")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits of the persistent-batch scheduler."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an LLMEngine is built from."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    engine: str = "torch"  # resolved: "torch" | "fast"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    # Schedule and launch step n + 1 before waiting for step n's tokens (see twinfer.engine).
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        if self.engine not in ("torch", "fast"):
            raise ValueError(f"engine must be 'torch' or 'fast' once resolved, got {self.engine!r}")


def resolve_device(device: str | None) -> str:
    """"auto"/None picks CUDA when present, else CPU."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device
