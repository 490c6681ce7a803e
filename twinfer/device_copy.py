"""Host -> device copies that do not wait for the device.

A copy from pageable host memory with ``non_blocking=False`` synchronizes the stream, i.e.
waits for every kernel already queued: with asynchronous scheduling that is the whole step in
flight. Going through pinned memory with ``non_blocking=True`` queues the copy instead.
"""

from __future__ import annotations

import torch


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a fresh CPU tensor) on ``device``, queued behind the device's work on CUDA."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
