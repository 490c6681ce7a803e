"""engine_fast: the optimized Runner (Triton kernels, fused ops, CUDA graphs for decode).

On CUDA it is what ``engine="auto"`` picks. On a CPU it runs only under Triton's interpreter
(``TRITON_INTERPRET=1``, slow: for tests).
"""

from __future__ import annotations

import os


def is_available() -> bool:
    """Triton is installed and there is CUDA, or the Triton interpreter is switched on."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def __getattr__(name: str):
    if name == "FastRunner":  # imported lazily: importing Triton is slow
        from engine_fast.runner import FastRunner
        return FastRunner
    raise AttributeError(name)
