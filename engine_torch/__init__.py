"""engine_torch: the readable pure-PyTorch reference engine (CPU and CUDA), the oracle."""

from engine_torch.runner import TorchRunner

__all__ = ["TorchRunner"]
