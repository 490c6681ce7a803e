"""Sizing and allocating the KV cache tensors both runners share the layout of.

Layout, per layer: K and V each ``[num_blocks, block_size, num_kv_heads, head_dim]`` in the
model dtype. A block holds ``block_size`` consecutive positions of one sequence.

Quantized caches keep that layout for their codes, one row of codes per (slot, KV head), with
float32 parameters per row: per token and head, because a key's magnitude varies by orders
of magnitude across heads and positions (the attention sink), which one scale per tensor
would not survive.
- ``kv_cache_dtype="int8"``: ``Int8KVCache``, int8 codes and a symmetric scale (LMDeploy's
  int8 KV also keeps a zero point; without one SmolLM2's WikiText-2 perplexity moves by 0.1%,
  bench/RESULTS.md).
- ``kv_cache_dtype="int4"``: ``Int4KVCache``, 4-bit codes over each row's [min, max] (at 16
  levels a zero point matters), two a byte: byte j of a row holds dimension j in its low
  nibble and j + D/2 in its high one (the rotary halves, so a kernel that rotates a key holds
  both codes of a byte in one lane). Keys are stored in a Hadamard basis (k H, H the
  orthonormal Sylvester matrix of size head_dim, as QuaRot does): a few key channels carry
  most of the magnitude, which one 4-bit scale per row cannot resolve, and H spreads them
  over the row. q k^T = (q H)(k H)^T, so the kernels rotate q instead of un-rotating keys;
  engine_torch's ``gather`` returns k itself. SmolLM2, 2 windows of 512: keys in int4 cost
  +11.9% perplexity unrotated, +3.0% rotated; values +1.0% either way (bench/RESULTS.md).
- ``kv_cache_dtype="k8v4"``: keys as in int8, values as in int4 (SmolLM2: values in int4
  cost under 1%, keys even rotated 4.6%).
The kernels' side is twinfer_kernels/quantized_kv.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from twinfer.config import CacheConfig, ModelConfig

# Memory kept back on CUDA for activations and the allocator's slack, beyond the KV cache.
_CUDA_ACTIVATION_RESERVE = 1 << 30
_INT8_MAX = 127.0
_INT4_MAX = 15.0


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 codes [..., D], float32 scales [...]): round(x / s), s = max|x| / 127
    per vector (the reference the int8 KV kernels are tested against)."""
    scale = x.float().abs().amax(-1) / _INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(x.float() / safe[..., None]).clamp(-_INT8_MAX, _INT8_MAX)
    return codes.to(torch.int8), scale


def dequantize_kv(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 codes [..., D] and scales [...] -> values [..., D] in ``dtype``."""
    return (codes.float() * scales[..., None]).to(dtype)


def hadamard(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The orthonormal n x n Sylvester Hadamard matrix (n a power of two), float32: entry
    (i, j) is (-1)^popcount(i & j) / sqrt(n), so it is its own inverse. Cached: int4 key
    caches use it at every store and gather; callers must not modify it."""
    return _hadamard(n, str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=8)
def _hadamard(n: int, device: str) -> torch.Tensor:
    if n <= 0 or n & (n - 1):
        raise ValueError(f"a Hadamard matrix needs a power-of-two size, got {n}")
    i = torch.arange(n, device=device)
    parity = torch.zeros(n, n, dtype=torch.int64, device=device)
    bits = i[:, None] & i[None, :]
    while bits.any():
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).float() / n ** 0.5


def quantize_kv_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> (packed uint8 [..., D/2], float32 scales [...], float32 minima [...]):
    codes round((x - min) / s) in 0..15, s = (max - min) / 15 per vector, packed as the
    module docstring says."""
    x = x.float()
    lo, hi = x.amin(-1), x.amax(-1)
    scale = (hi - lo) / _INT4_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((x - lo[..., None]) / safe[..., None]).clamp(0, _INT4_MAX)
    codes = codes.to(torch.uint8)
    half = x.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << 4), scale, lo


def dequantize_kv_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """Packed 4-bit codes [..., D/2], scales and minima [...] -> values [..., D] in ``dtype``."""
    codes = torch.cat([packed & 15, packed >> 4], -1).float()
    return (codes * scales[..., None] + mins[..., None]).to(dtype)


@dataclass
class Int8KVCache:
    """One layer's K (or V) cache in int8: ``codes`` [num_blocks, block_size, Hkv, D] int8 and
    ``scales`` [num_blocks, block_size, Hkv] float32; a cached vector is codes * scale."""

    codes: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.codes, self.scales

    def store(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Quantize x [T, Hkv, D] into the rows of ``slots`` [T]."""
        codes, scales = quantize_kv(x)
        self.codes.view(-1, *codes.shape[1:])[slots] = codes
        self.scales.view(-1, x.shape[1])[slots] = scales

    def gather(self, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The rows of ``blocks`` [...], dequantized: [..., block_size, Hkv, D] in ``dtype``."""
        return dequantize_kv(self.codes[blocks], self.scales[blocks], dtype)


@dataclass
class Int4KVCache:
    """One layer's K (or V) cache in 4 bits: ``codes`` [num_blocks, block_size, Hkv, D/2] uint8
    (two codes a byte), ``scales`` and ``mins`` [num_blocks, block_size, Hkv] float32; a cached
    value is code * scale + min, of x H where ``rotated`` (keys; see the module docstring)."""

    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    rotated: bool = False

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.codes, self.scales, self.mins

    def store(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Quantize x [T, Hkv, D] into the rows of ``slots`` [T]."""
        if self.rotated:
            x = x.float() @ hadamard(x.shape[-1], x.device)
        packed, scales, mins = quantize_kv_int4(x)
        self.codes.view(-1, *packed.shape[1:])[slots] = packed
        self.scales.view(-1, x.shape[1])[slots] = scales
        self.mins.view(-1, x.shape[1])[slots] = mins

    def gather(self, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The rows of ``blocks`` [...], dequantized (and rotated back): [..., block_size, Hkv,
        D] in ``dtype``."""
        x = dequantize_kv_int4(self.codes[blocks], self.scales[blocks], self.mins[blocks],
                               torch.float32)
        if self.rotated:
            x = x @ hadamard(x.shape[-1], x.device)  # H is its own inverse
        return x.to(dtype)


KVCache = torch.Tensor | Int8KVCache | Int4KVCache


# kv_cache_dtype -> how keys and values are each kept ("auto": the model dtype)
_KINDS = {"auto": ("auto", "auto"), "int8": ("int8", "int8"), "int4": ("int4", "int4"),
          "k8v4": ("int8", "int4")}


def _row_bytes(kind: str, head_dim: int, dtype: torch.dtype) -> int:
    if kind == "int8":
        return head_dim + 4  # int8 codes, one float32 scale
    if kind == "int4":
        return head_dim // 2 + 8  # two codes a byte, a float32 scale and minimum
    return head_dim * torch.empty((), dtype=dtype).element_size()


def kv_block_bytes(model: ModelConfig, block_size: int, dtype: torch.dtype,
                   kv_cache_dtype: str = "auto") -> int:
    """Bytes one block takes across all layers, K and V."""
    per_head = sum(_row_bytes(kind, model.head_dim, dtype) for kind in _KINDS[kv_cache_dtype])
    return model.num_layers * block_size * model.num_kv_heads * per_head


def determine_num_kv_blocks(model: ModelConfig, cache: CacheConfig, dtype: torch.dtype,
                            device: torch.device | str) -> int:
    """Blocks that fit the budget: explicit, ``gpu_memory_utilization`` of the device after
    weights (CUDA), or ``cpu_kv_cache_bytes`` (CPU)."""
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    per_block = kv_block_bytes(model, cache.block_size, dtype, cache.kv_cache_dtype)
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * cache.gpu_memory_utilization) - (total - free)
        budget -= _CUDA_ACTIVATION_RESERVE
    else:
        budget = cache.cpu_kv_cache_bytes
    return max(budget // per_block, 0)


def allocate_kv_caches(model: ModelConfig, num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: torch.device | str,
                       kv_cache_dtype: str = "auto") -> list[tuple[KVCache, KVCache]]:
    """Zeroed (K, V) cache pairs, one per layer."""
    shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)

    def params() -> torch.Tensor:
        return torch.zeros(shape[:-1], dtype=torch.float32, device=device)

    def one(kind: str, keys: bool) -> KVCache:
        if kind == "int8":
            return Int8KVCache(torch.zeros(shape, dtype=torch.int8, device=device), params())
        if kind == "int4":
            packed = torch.zeros(*shape[:-1], shape[-1] // 2, dtype=torch.uint8, device=device)
            return Int4KVCache(packed, params(), params(), rotated=keys)
        return torch.zeros(shape, dtype=dtype, device=device)

    k_kind, v_kind = _KINDS[kv_cache_dtype]
    return [(one(k_kind, keys=True), one(v_kind, keys=False)) for _ in range(model.num_layers)]
