"""Triton kernels, one file per op family. Each has a public wrapper that checks its inputs,
allocates the output and computes the grid, and a test against a torch reference."""
