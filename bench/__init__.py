"""Benchmarks and accuracy/speed reports."""
