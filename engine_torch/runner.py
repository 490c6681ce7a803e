"""TorchRunner: the reference implementation of the Runner interface."""

from __future__ import annotations

import torch

from engine_torch.model import LlamaModel
from twinfer.batch import DeviceTokens, ScheduledBatch, build_attention_metadata
from twinfer.config import EngineConfig
from twinfer.kv_cache_memory import KVCache, allocate_kv_caches
from twinfer.weights import ModelWeights


class TorchRunner:
    """Runs a ScheduledBatch through the pure-PyTorch model and returns logits."""

    def __init__(self, config: EngineConfig, weights: ModelWeights):
        self.config = config
        self.device = torch.device(config.device)
        self.model = LlamaModel(weights, self.device, config.dtype)
        self.kv_caches: list[tuple[KVCache, KVCache]] = []

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Allocate K and V caches of ``num_blocks`` blocks for every layer."""
        self.kv_caches = allocate_kv_caches(self.config.model, num_blocks,
                                            self.config.cache.block_size, self.config.dtype,
                                            self.device, self.config.cache.kv_cache_dtype)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch,
                device_tokens: DeviceTokens | None = None) -> torch.Tensor:
        """Compute the batch; float32 logits [len(batch.logits_indices), vocab]."""
        meta = build_attention_metadata(batch, self.device)
        if device_tokens is not None:
            device_tokens.write_into(meta.input_ids)
        hidden = self.model.forward(meta, self.kv_caches)
        return self.model.compute_logits(hidden[meta.logits_indices])
