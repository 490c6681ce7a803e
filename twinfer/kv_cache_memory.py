"""Sizing and allocating the KV cache tensors both runners share the layout of.

Layout, per layer: K and V each ``[num_blocks, block_size, num_kv_heads, head_dim]`` in the
model dtype. A block holds ``block_size`` consecutive positions of one sequence.
"""

from __future__ import annotations

import torch

from twinfer.config import CacheConfig, ModelConfig

# Memory kept back on CUDA for activations and the allocator's slack, beyond the KV cache.
_CUDA_ACTIVATION_RESERVE = 1 << 30


def kv_block_bytes(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * elem


def determine_num_kv_blocks(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype,
                            device: torch.device | str) -> int:
    """Blocks that fit the budget: explicit, ``gpu_memory_utilization`` of the device after
    weights (CUDA), or ``cpu_kv_cache_bytes`` (CPU)."""
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    per_block = kv_block_bytes(model, cache.block_size, dtype)
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * cache.gpu_memory_utilization) - (total - free)
        budget -= _CUDA_ACTIVATION_RESERVE
    else:
        budget = cache.cpu_kv_cache_bytes
    return max(budget // per_block, 0)


def allocate_kv_caches(model: ModelConfig, num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: torch.device | str
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed (K, V) cache pairs, one per layer."""
    shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device),
             torch.zeros(shape, dtype=dtype, device=device)) for _ in range(model.num_layers)]
