"""Triton kernels, one file per op family (arrives with the engine_fast issue)."""
