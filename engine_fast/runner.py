"""FastRunner: the Runner interface on Triton kernels, with decode steps replayed as CUDA graphs.

A decode-only batch of n sequences is padded to the smallest captured bucket >= n and replayed
from a CUDA graph (static input buffers live on the runner); anything else (prefill chunks,
mixed batches, CPU under the Triton interpreter) runs eagerly. Padding rows have context
length 0 and slot -1, so they neither read nor write the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from engine_fast.model import FastLlama
from twinfer.batch import AttentionMetadata, DeviceTokens, ScheduledBatch, build_attention_metadata
from twinfer.config import EngineConfig
from twinfer.kv_cache_memory import KVCache, allocate_kv_caches
from twinfer.weights import ModelWeights

_GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448,
                  512)


@dataclass
class _DecodeGraph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [bucket, vocab] written by every replay


class FastRunner:
    """Runs ScheduledBatches through FastLlama; CUDA graphs for decode on CUDA."""

    def __init__(self, config: EngineConfig, weights: ModelWeights, use_cuda_graphs: bool = True):
        self.config = config
        self.device = torch.device(config.device)
        self.model = FastLlama(weights, self.device, config.dtype)
        self.kv_caches: list[tuple[KVCache, KVCache]] = []
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self.graphs: dict[int, _DecodeGraph] = {}
        self._static: dict[str, torch.Tensor] = {}
        # The decode kernel's attention over GQA groups needs no sliding-window support
        # when the model has none; otherwise decode goes through the prefill kernel.
        self._decode_kernel_ok = config.model.sliding_window is None
        self._num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                         if self.device.type == "cuda" else 0)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Allocate the caches, then (on CUDA) capture the decode graphs that read them."""
        self.kv_caches = allocate_kv_caches(self.config.model, num_blocks,
                                            self.config.cache.block_size, self.config.dtype,
                                            self.device, self.config.cache.kv_cache_dtype)
        if self.use_cuda_graphs and self._decode_kernel_ok:
            self.capture_cuda_graphs()

    def _num_splits(self, num_seqs: int) -> int:
        """Split the context so that sequences x KV heads x splits fill the GPU's SMs."""
        if not self._num_sms:
            return 1
        work = num_seqs * self.config.model.num_kv_heads
        return max(1, min(16, -(-2 * self._num_sms // work)))

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch,
                device_tokens: DeviceTokens | None = None) -> torch.Tensor:
        """Compute the batch; float32 logits [len(batch.logits_indices), vocab]."""
        n = batch.num_seqs
        decode_only = self._decode_kernel_ok and batch.num_tokens == n
        if decode_only and self.graphs and batch.logits_indices == list(range(n)):
            bucket = next((b for b in self.graphs if b >= n), None)
            if bucket is not None:
                return self._replay(batch, bucket, device_tokens)
        meta = build_attention_metadata(batch, self.device)
        if device_tokens is not None:
            device_tokens.write_into(meta.input_ids)
        hidden = self.model.forward(meta, self.kv_caches, decode_only, self._num_splits(n))
        return self.model.compute_logits(hidden[meta.logits_indices])

    # -- CUDA graphs ------------------------------------------------------------------------

    def capture_cuda_graphs(self) -> None:
        """Capture one decode graph per batch-size bucket up to max_num_seqs."""
        sched = self.config.scheduler
        max_bs = next((b for b in _GRAPH_BUCKETS if b >= sched.max_num_seqs), _GRAPH_BUCKETS[-1])
        buckets = [b for b in _GRAPH_BUCKETS if b <= max_bs]
        max_blocks = -(-sched.max_model_len // self.config.cache.block_size)
        dev = self.device
        self._static = {
            "input_ids": torch.zeros(max_bs, dtype=torch.long, device=dev),
            "positions": torch.zeros(max_bs, dtype=torch.long, device=dev),
            "slot_mapping": torch.full((max_bs,), -1, dtype=torch.long, device=dev),
            "block_tables": torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=dev),
            "context_lens": torch.zeros(max_bs, dtype=torch.int32, device=dev),
        }
        # Pinned staging buffers: the per-step host->device copies are then truly async. Two
        # sets, used in turn: with asynchronous scheduling a step's inputs are staged while the
        # previous step's copies may still be queued (the host waited only for the one before).
        self._host = [self._staging_buffers(max_bs, max_blocks) for _ in range(2)]
        self._num_replays = 0
        pool = None
        for bs in tqdm(sorted(buckets, reverse=True), desc="capturing CUDA graphs"):
            meta = self._static_meta(bs)
            splits = self._num_splits(bs)
            for _ in range(2):  # compile the kernels and settle the allocator outside capture
                self.model.compute_logits(self.model.forward(meta, self.kv_caches, True, splits))
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model.compute_logits(
                    self.model.forward(meta, self.kv_caches, True, splits))
            pool = graph.pool()
            self.graphs[bs] = _DecodeGraph(graph, logits)
        self.graphs = dict(sorted(self.graphs.items()))
        torch.cuda.synchronize(dev)

    @staticmethod
    def _staging_buffers(max_bs: int, max_blocks: int) -> dict[str, torch.Tensor]:
        host = {"ints": torch.zeros(4, max_bs, dtype=torch.long).pin_memory(),
                "block_tables": torch.zeros(max_bs, max_blocks, dtype=torch.int32).pin_memory()}
        host["ints_np"] = host["ints"].numpy()
        host["block_tables_np"] = host["block_tables"].numpy()
        return host

    def _static_meta(self, bs: int) -> AttentionMetadata:
        s = self._static
        return AttentionMetadata(
            input_ids=s["input_ids"][:bs], positions=s["positions"][:bs],
            slot_mapping=s["slot_mapping"][:bs],
            query_start_loc=torch.arange(bs + 1, dtype=torch.int32, device=self.device),
            context_lens=s["context_lens"][:bs], block_tables=s["block_tables"][:bs],
            logits_indices=torch.arange(bs, device=self.device),
            query_lens_cpu=[1] * bs, context_lens_cpu=[0] * bs)

    def _replay(self, batch: ScheduledBatch, bucket: int,
                device_tokens: DeviceTokens | None) -> torch.Tensor:
        n, s = batch.num_seqs, self._static
        host = self._host[self._num_replays % 2]
        self._num_replays += 1
        width = max(len(t) for t in batch.block_tables)
        # Filled through numpy views of the pinned buffers: torch.tensor() on nested lists
        # costs ~80 ns per element, i.e. milliseconds per step for 100 block tables at long
        # contexts, all of it serial to the GPU.
        ints, tables = host["ints_np"], host["block_tables_np"]
        ints[0, :n] = batch.input_ids
        ints[1, :n] = batch.positions
        ints[2, :n] = batch.slot_mapping
        ints[3, :n] = batch.context_lens
        ints[2, n:bucket] = -1  # padding rows: no cache write,
        ints[3, n:bucket] = 0  # and no attention
        for i, t in enumerate(batch.block_tables):
            tables[i, :len(t)] = t
            tables[i, len(t):width] = 0
        ints = host["ints"]
        s["input_ids"][:bucket].copy_(ints[0, :bucket], non_blocking=True)
        s["positions"][:bucket].copy_(ints[1, :bucket], non_blocking=True)
        s["slot_mapping"][:bucket].copy_(ints[2, :bucket], non_blocking=True)
        s["context_lens"][:bucket].copy_(ints[3, :bucket], non_blocking=True)
        s["block_tables"][:n, :width].copy_(host["block_tables"][:n, :width], non_blocking=True)
        if device_tokens is not None:
            device_tokens.write_into(s["input_ids"])
        entry = self.graphs[bucket]
        entry.graph.replay()
        return entry.logits[:n]
