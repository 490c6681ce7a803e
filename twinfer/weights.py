"""Load model weights into ``ModelWeights``: Hugging Face safetensors directories and GGUF files.

Tensors keep their Hugging Face names (``model.layers.0.self_attn.q_proj.weight``) whatever
the source, so one loader maps every checkpoint onto one set of names and both engines read
the same dictionary. Nothing is ever unpickled: only safetensors and GGUF are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from twinfer.config import ModelConfig
from twinfer.quant import QuantizedWeight
from twinfer.quant_formats import QuantFormatError, read_quantized_linear


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


@dataclass
class ModelWeights:
    """A model's configuration and its tensors under Hugging Face names (on CPU)."""

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    source: Path
    hf_config: dict = field(default_factory=dict)  # config.json as read (or built from GGUF)

    @property
    def quantization_config(self) -> dict | None:
        """config.json's ``quantization_config`` (GPTQ, AWQ, compressed-tensors), if any."""
        return self.hf_config.get("quantization_config") or None

    def quantized_linear(self, prefix: str) -> QuantizedWeight | None:
        """Linear ``prefix`` (e.g. ``model.layers.0.mlp.up_proj``) in the canonical quantized
        layout, or None when the checkpoint stores it dense."""
        try:
            return read_quantized_linear(self.tensors, prefix, self.quantization_config)
        except QuantFormatError as e:
            raise WeightsError(f"{self.source}: {e}") from e

    def get(self, name: str) -> torch.Tensor:
        """Return one tensor, or fail naming the tensor and the checkpoint."""
        if name not in self.tensors:
            raise WeightsError(f"{self.source}: missing tensor {name!r}")
        return self.tensors[name]

    def check_complete(self) -> None:
        """Fail, naming the first missing tensor, unless every tensor the model needs is here."""
        for name in expected_tensor_names(self.config):
            linear = name.removesuffix(".weight")
            if name.endswith("_proj.weight") and self.quantized_linear(linear) is not None:
                continue
            self.get(name)


def expected_tensor_names(cfg: ModelConfig) -> list[str]:
    """The Hugging Face tensor names a model with this config needs."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{n}_proj.weight" for n in ("q", "k", "v", "o")]
        names += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        if cfg.qkv_bias:
            names += [p + f"self_attn.{n}_proj.bias" for n in ("q", "k", "v")]
        if cfg.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    return names


def load_weights(path: str | Path) -> ModelWeights:
    """Load a Hugging Face directory (single or sharded safetensors) or a ``.gguf`` file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        weights = load_gguf(path)
    elif path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            weights = load_gguf(ggufs[0])
        else:
            weights = load_hf_dir(path)
    elif path.exists():
        raise WeightsError(f"{path}: not a model directory or a .gguf file")
    else:
        raise WeightsError(f"{path}: no such file or directory")
    weights.check_complete()
    return weights


def load_hf_dir(path: Path) -> ModelWeights:
    """Read ``config.json`` and every safetensors shard of a Hugging Face model directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_file = path / "config.json"
    if not config_file.exists():
        raise WeightsError(f"{path}: no config.json")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{config_file}: invalid JSON ({e})") from e
    config = ModelConfig.from_hf(cfg, source=str(config_file))

    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        shard_names = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        shards = [path / s for s in shard_names]
    else:
        shards = sorted(path.glob("*.safetensors"))
    if not shards:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise WeightsError(f"{path}: only pickle checkpoints (.bin/.pt); twinfer reads "
                               "safetensors or GGUF and never unpickles")
        raise WeightsError(f"{path}: no .safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not shard.exists():
            raise WeightsError(f"{shard}: listed in {index_file.name} but missing")
        try:
            # load_file may return tensors that are only 8-byte aligned; the engines copy
            # them into fresh tensors when moving to their device and dtype.
            tensors.update(load_file(str(shard)))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise WeightsError(f"{shard}: corrupt or truncated safetensors file ({e})") from e
    return ModelWeights(config=config, tensors=tensors, source=path, hf_config=cfg)


# GGUF tensor names (llama.cpp) -> Hugging Face names.
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}


def _gguf_hf_name(name: str) -> str | None:
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    parts = name.split(".")  # blk.{i}.{kind}.{weight|bias}
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _unpermute_rotary(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs -> HF's half split)."""
    half = w.shape[0] // num_heads // 2
    return (w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2)
            .reshape(w.shape).contiguous())


def gguf_metadata(reader) -> dict:
    """Scalar and string metadata of a GGUF file (token lists skipped)."""
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "token_type",
                                                              "scores")):
            continue
        meta[key] = f.contents()
    return meta


def hf_config_from_gguf(meta: dict, vocab_size: int, has_output: bool, source: str) -> dict:
    """Translate GGUF metadata into a Hugging Face ``config.json`` dictionary."""
    arch = meta.get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise WeightsError(f"{source}: unsupported GGUF architecture {arch!r} "
                           f"(supported: {', '.join(_GGUF_ARCHS)})")
    a = arch
    n_heads = int(meta[f"{a}.attention.head_count"])
    hidden = int(meta[f"{a}.embedding_length"])
    cfg = {
        "architectures": [_GGUF_ARCHS[arch]],
        "vocab_size": int(meta.get(f"{a}.vocab_size", vocab_size)),
        "hidden_size": hidden,
        "intermediate_size": int(meta[f"{a}.feed_forward_length"]),
        "num_hidden_layers": int(meta[f"{a}.block_count"]),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(meta.get(f"{a}.attention.head_count_kv", n_heads)),
        "head_dim": int(meta.get(f"{a}.attention.key_length", hidden // n_heads)),
        "rms_norm_eps": float(meta[f"{a}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get(f"{a}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(f"{a}.context_length", 4096)),
        "tie_word_embeddings": not has_output,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if meta.get(f"{a}.rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear",
                               "factor": float(meta[f"{a}.rope.scaling.factor"])}
    return cfg


def load_gguf(path: Path) -> ModelWeights:
    """Read a GGUF file, dequantizing every tensor to float32 and mapping names to HF's."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise WeightsError(f"{path}: corrupt or truncated GGUF file ({e})") from e
    meta = gguf_metadata(reader)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else 0
    names = {t.name for t in reader.tensors}
    cfg_dict = hf_config_from_gguf(meta, vocab, "output.weight" in names, str(path))
    config = ModelConfig.from_hf(cfg_dict, source=str(path))
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        hf_name = _gguf_hf_name(t.name)
        if hf_name is None:
            continue  # e.g. rope_freqs: recomputed from the config
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
        w = torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # owned, writable
        if config.architecture == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = _unpermute_rotary(w, config.num_heads)
        elif config.architecture == "llama" and t.name.endswith(("attn_k.weight",
                                                                 "attn_k.bias")):
            w = _unpermute_rotary(w, config.num_kv_heads)
        tensors[hf_name] = w
    return ModelWeights(config=config, tensors=tensors, source=path, hf_config=cfg_dict)
