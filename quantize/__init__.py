"""Calibration and quantization pipeline (arrives with the quantize issue)."""
