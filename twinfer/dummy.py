"""Random weights in a real model's shapes (``--load-format dummy``, as in vLLM).

Speed does not depend on the values of the weights, so a model's shapes are enough to measure
a server at Llama-3.1-8B size on a machine that has no copy of its 16 GB checkpoint. The shapes
come from a built-in preset (``llama-3.1-8b``) or from any Hugging Face directory's
``config.json``; the tokenizer is the directory's own when it has one, otherwise a synthetic
word-level tokenizer that names every id (``<t123>``), so that any generated id can be decoded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from twinfer.config import ModelConfig
from twinfer.tokenizer import Tokenizer
from twinfer.weights import ModelWeights, WeightsError, expected_tensor_names

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA3 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
           "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE,
           "max_position_embeddings": 131072, "bos_token_id": 128000,
           "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16"}

# config.json of each preset, as published with the model.
SHAPE_PRESETS: dict[str, dict] = {
    "llama-3.1-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "tie_word_embeddings": False},
    "llama-3.2-1b": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "head_dim": 64, "tie_word_embeddings": True},
}


def dummy_hf_config(model: str | Path) -> dict:
    """config.json of a preset name, a model directory or a config.json file."""
    if str(model).lower() in SHAPE_PRESETS:
        return dict(SHAPE_PRESETS[str(model).lower()])
    path = Path(model).expanduser()
    config_file = path / "config.json" if path.is_dir() else path
    if config_file.name != "config.json" or not config_file.exists():
        raise WeightsError(
            f"--load-format dummy needs a shape preset ({', '.join(SHAPE_PRESETS)}), a model "
            f"directory with a config.json, or a config.json file; got {str(model)!r}")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{config_file}: invalid JSON ({e})") from e


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a model of this config needs, by Hugging Face name, with its shape."""
    h, d = cfg.hidden_size, cfg.head_dim
    out_features = {"q_proj": cfg.num_heads * d, "k_proj": cfg.num_kv_heads * d,
                    "v_proj": cfg.num_kv_heads * d, "o_proj": h, "gate_proj":
                    cfg.intermediate_size, "up_proj": cfg.intermediate_size, "down_proj": h}
    in_features = {"o_proj": cfg.num_heads * d, "down_proj": cfg.intermediate_size}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in expected_tensor_names(cfg):
        kind = name.split(".")[-2]
        if kind in ("embed_tokens", "lm_head"):
            shapes[name] = (cfg.vocab_size, h)
        elif kind in ("q_norm", "k_norm"):
            shapes[name] = (d,)
        elif "norm" in kind:
            shapes[name] = (h,)
        elif name.endswith(".bias"):
            shapes[name] = (out_features[kind],)
        else:
            shapes[name] = (out_features[kind], in_features.get(kind, h))
    return shapes


def dummy_weights(hf_config: dict, dtype: torch.dtype, device: str | torch.device,
                  seed: int = 0) -> ModelWeights:
    """Random weights (N(0, 0.02) matrices, unit norms) made directly on ``device``."""
    cfg = ModelConfig.from_hf(hf_config, source="dummy config")
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, shape in tensor_shapes(cfg).items():
        if len(shape) == 1 and "norm" in name:
            tensors[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            t = torch.empty(shape, dtype=dtype, device=device)
            tensors[name] = t.normal_(0.0, 0.02, generator=gen)
    return ModelWeights(cfg, tensors, source=Path(f"dummy:{cfg.architecture}"),
                        hf_config=hf_config)


def synthetic_tokenizer(vocab_size: int, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
    """A word-level tokenizer over ``<t0> ... <tN-1>``: prompts are those words separated by
    spaces (unknown words map to ``<t0>``), and every id decodes, which random weights need."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<t{i}>": i for i in range(vocab_size)}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<t0>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    eos = f"<t{eos_token_ids[0]}>" if eos_token_ids else None
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<t0>", eos_token=eos)
    hf.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    return Tokenizer(hf, eos_token_ids)


def dummy_tokenizer(model: str | Path, cfg: ModelConfig) -> Tokenizer:
    """The model directory's tokenizer when it has one, else :func:`synthetic_tokenizer`."""
    path = Path(model).expanduser()
    directory = path if path.is_dir() else path.parent
    if path.exists() and (directory / "tokenizer.json").exists():
        return Tokenizer.load(directory, cfg.eos_token_ids)
    return synthetic_tokenizer(cfg.vocab_size, cfg.eos_token_ids)
