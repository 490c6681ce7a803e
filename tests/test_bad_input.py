"""Bad input gets a clear error naming the problem, and requests in flight still complete."""

from __future__ import annotations

import json
import shutil

import pytest

from twinfer import LLM, SamplingParams
from twinfer.models import ModelNotFoundError
from twinfer.registry import EngineUnavailableError
from twinfer.weights import WeightsError, load_weights


@pytest.fixture(scope="module")
def llm(tiny_model_factory):
    return LLM(tiny_model_factory("llama"), engine="torch", num_kv_blocks=64, max_model_len=128)


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt_is_rejected(llm, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([prompt])


def test_prompt_longer_than_max_model_len_is_rejected(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5] * 200])


def test_out_of_vocabulary_token_id_is_rejected(llm):
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[5, 100000]])


@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"min_p": 2.0}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"), ({"logprobs": 1000}, "logprobs"),
    ({"stop": [""]}, "stop"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_unknown_model_name_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'"):
        LLM("no-such-model", download_dir=tmp_path)


def test_missing_path_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not an existing file"):
        LLM(str(tmp_path / "absent"), download_dir=tmp_path)


def test_fast_engine_without_cuda_or_interpreter_is_a_clear_error(tiny_model_factory):
    import os

    if os.environ.get("TRITON_INTERPRET") == "1" or __import__("torch").cuda.is_available():
        old = os.environ.pop("TRITON_INTERPRET", None)
        try:
            if __import__("torch").cuda.is_available():
                pytest.skip("CUDA present: engine='fast' is available")
            with pytest.raises(EngineUnavailableError, match="TRITON_INTERPRET"):
                LLM(tiny_model_factory("llama"), engine="fast")
        finally:
            if old is not None:
                os.environ["TRITON_INTERPRET"] = old


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_names_the_file(tiny_model_factory, tmp_path):
    model = _copy_model(tiny_model_factory("llama"), tmp_path / "m")
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(WeightsError, match="model.safetensors.*(corrupt|truncated)"):
        load_weights(model)


def test_missing_tensor_is_named(tiny_model_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _copy_model(tiny_model_factory("llama"), tmp_path / "m")
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model / "model.safetensors")
    with pytest.raises(WeightsError, match="model.layers.1.mlp.up_proj.weight"):
        load_weights(model)


def test_unsupported_architecture_is_named(tiny_model_factory, tmp_path):
    model = _copy_model(tiny_model_factory("llama"), tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json.*unsupported architecture.*GPT2"):
        load_weights(model)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
        "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(WeightsError, match="never unpickles"):
        load_weights(tmp_path)


def test_truncated_gguf_names_the_file(smollm2_path, tmp_path):
    bad = tmp_path / "bad.gguf"
    with open(smollm2_path, "rb") as f:
        bad.write_bytes(f.read(5_000_000))
    with pytest.raises(WeightsError, match="bad.gguf"):
        load_weights(bad)


def test_bad_request_does_not_disturb_requests_in_flight(llm):
    engine = llm.engine
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"good-{i}", [2 + i, 3, 4], params)
    engine.step()
    for bad in ("", [], [5] * 500, [-1]):
        with pytest.raises(ValueError):
            engine.add_request("bad", bad, params)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good-0", [2], params)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == ["good-0", "good-1", "good-2"]
    assert all(len(o.outputs[0].token_ids) == 8 for o in finished.values())
    assert engine.block_manager.num_used_blocks == 0
