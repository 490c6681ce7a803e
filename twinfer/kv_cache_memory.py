"""Sizing and allocating the KV cache tensors both runners share the layout of.

Layout, per layer: K and V each ``[num_blocks, block_size, num_kv_heads, head_dim]`` in the
model dtype. A block holds ``block_size`` consecutive positions of one sequence.

With ``kv_cache_dtype="int8"`` each of K and V is an ``Int8KVCache``: the same layout in int8
codes plus one float32 scale per (slot, KV head), symmetric (LMDeploy's int8 KV also keeps a
zero point per token and head; without one SmolLM2's WikiText-2 perplexity moves by 0.1%,
bench/RESULTS.md). Per token and head, because a key's magnitude varies by orders of
magnitude across heads and positions (the attention sink), which one scale per tensor would
not survive. The kernels' side is twinfer_kernels/kv_int8.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twinfer.config import CacheConfig, ModelConfig

# Memory kept back on CUDA for activations and the allocator's slack, beyond the KV cache.
_CUDA_ACTIVATION_RESERVE = 1 << 30
_INT8_MAX = 127.0


@dataclass
class Int8KVCache:
    """One layer's K (or V) cache in int8: ``codes`` [num_blocks, block_size, Hkv, D] int8 and
    ``scales`` [num_blocks, block_size, Hkv] float32; a cached vector is codes * scale."""

    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


KVCache = torch.Tensor | Int8KVCache


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 codes [..., D], float32 scales [...]): round(x / s), s = max|x| / 127
    per vector (the reference the int8 KV kernels are tested against)."""
    scale = x.float().abs().amax(-1) / _INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(x.float() / safe[..., None]).clamp(-_INT8_MAX, _INT8_MAX)
    return codes.to(torch.int8), scale


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 codes [..., D] and scales [...] -> values [..., D] in ``dtype``."""
    return (codes.float() * scales[..., None]).to(dtype)


def kv_block_bytes(model: ModelConfig, block_size: int, dtype: torch.dtype,
                   kv_cache_dtype: str = "auto") -> int:
    """Bytes one block takes across all layers, K and V."""
    if kv_cache_dtype == "int8":
        per_head = model.head_dim + 4  # int8 codes, one float32 scale
    else:
        per_head = model.head_dim * torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * per_head


def determine_num_kv_blocks(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype,
                            device: torch.device | str) -> int:
    """Blocks that fit the budget: explicit, ``gpu_memory_utilization`` of the device after
    weights (CUDA), or ``cpu_kv_cache_bytes`` (CPU)."""
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    per_block = kv_block_bytes(model, cache.block_size, dtype, cache.kv_cache_dtype)
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * cache.gpu_memory_utilization) - (total - free)
        budget -= _CUDA_ACTIVATION_RESERVE
    else:
        budget = cache.cpu_kv_cache_bytes
    return max(budget // per_block, 0)


def allocate_kv_caches(model: ModelConfig, num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: torch.device | str,
                       kv_cache_dtype: str = "auto") -> list[tuple[KVCache, KVCache]]:
    """Zeroed (K, V) cache pairs, one per layer."""
    shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)

    def one() -> KVCache:
        if kv_cache_dtype == "int8":
            return Int8KVCache(torch.zeros(shape, dtype=torch.int8, device=device),
                               torch.zeros(shape[:-1], dtype=torch.float32, device=device))
        return torch.zeros(shape, dtype=dtype, device=device)

    return [(one(), one()) for _ in range(model.num_layers)]
