"""The one place ``twinfer/`` reaches an engine: EngineConfig.engine names the Runner.

A Runner has two methods: ``allocate_kv_cache(num_blocks)`` and
``execute(batch: ScheduledBatch, device_tokens: DeviceTokens | None = None) -> float32 logits
[len(batch.logits_indices), vocab]``; ``device_tokens`` fills the input rows whose tokens the
step still in flight sampled (asynchronous scheduling), on the device.
"""

from __future__ import annotations

from typing import Protocol

import torch

from twinfer.batch import DeviceTokens, ScheduledBatch
from twinfer.config import EngineConfig
from twinfer.weights import ModelWeights


class Runner(Protocol):
    def allocate_kv_cache(self, num_blocks: int) -> None: ...

    def execute(self, batch: ScheduledBatch,
                device_tokens: DeviceTokens | None = None) -> torch.Tensor: ...


class EngineUnavailableError(RuntimeError):
    """The requested execution engine cannot run here."""


def fast_engine_available() -> bool:
    """Whether engine_fast can be imported and run (it needs Triton)."""
    try:
        import engine_fast
    except ImportError:
        return False
    return engine_fast.is_available()


def resolve_engine(engine: str, device: str) -> str:
    """"auto" picks engine_fast on CUDA when it is available, engine_torch otherwise."""
    if engine not in ("auto", "torch", "fast"):
        raise ValueError(f"engine must be 'auto', 'torch' or 'fast', got {engine!r}")
    if engine == "auto":
        return "fast" if device.startswith("cuda") and fast_engine_available() else "torch"
    if engine == "fast" and not fast_engine_available():
        raise EngineUnavailableError(
            "engine 'fast' (Triton kernels) needs triton installed and either a CUDA device or "
            "Triton's CPU interpreter (TRITON_INTERPRET=1, slow); use engine='torch' here")
    return engine


def create_runner(config: EngineConfig, weights: ModelWeights) -> Runner:
    """Build the runner the config names."""
    if config.engine == "torch":
        from engine_torch import TorchRunner
        return TorchRunner(config, weights)
    import engine_fast
    return engine_fast.FastRunner(config, weights)
