"""engine_fast: the optimized Runner (Triton kernels, fused ops, CUDA graphs).

Not implemented yet (tracked in its own issue); ``is_available`` says so, and
``twinfer.registry`` turns that into a clear error for engine="fast".
"""


def is_available() -> bool:
    """Whether FastRunner can run in this build: not until engine_fast lands."""
    return False
