"""--load-format dummy (random weights in a model's shapes) and --quantization (RTN at load)."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
import torch
from serving import free_port

from twinfer import LLM, SamplingParams
from twinfer.config import ModelConfig
from twinfer.dummy import (
    SHAPE_PRESETS,
    dummy_hf_config,
    dummy_weights,
    synthetic_tokenizer,
    tensor_shapes,
)
from twinfer.online_quant import quantize_weights_rtn
from twinfer.quant import QuantScheme, fake_quantize
from twinfer.weights import WeightsError, load_weights


def test_llama31_8b_preset_has_the_published_parameter_count():
    cfg = ModelConfig.from_hf(SHAPE_PRESETS["llama-3.1-8b"])
    params = sum(torch.Size(s).numel() for s in tensor_shapes(cfg).values())
    assert params == 8_030_261_248  # Meta-Llama-3.1-8B, as reported by transformers


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_dummy_weights_have_the_names_and_shapes_transformers_builds(tiny_model_factory, arch):
    path = tiny_model_factory(arch)
    real = load_weights(path)
    fake = dummy_weights(dummy_hf_config(path), torch.float32, "cpu")
    assert {n: t.shape for n, t in fake.tensors.items()} == \
        {n: t.shape for n, t in real.tensors.items()}


def test_dummy_load_format_rejects_a_model_without_config(tmp_path):
    with pytest.raises(WeightsError, match="load-format dummy needs a shape preset"):
        dummy_hf_config(tmp_path)


def test_synthetic_tokenizer_decodes_every_id_and_encodes_its_own_words():
    tok = synthetic_tokenizer(1000, eos_token_ids=(999,))
    assert tok.encode("<t5> <t17> <t998>", add_special_tokens=False) == [5, 17, 998]
    assert tok.decode([5, 17, 998]) == "<t5> <t17> <t998>"
    assert tok.eos_token_ids == (999,)


def test_dummy_llm_uses_the_directorys_tokenizer_and_generates(tiny_model_factory):
    llm = LLM(tiny_model_factory("llama"), load_format="dummy", engine="torch",
              num_kv_blocks=256)
    assert llm.tokenizer.encode("w5 w6", add_special_tokens=False) == [5, 6]
    out = llm.generate([[3, 4, 5]], SamplingParams(max_tokens=8, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8


@pytest.mark.parametrize("spec", ["w4a16-g32", "w4a16-g32-sym", "w8a16", "w8a8"])
def test_online_quantization_equals_rtn_fake_quantization(tiny_model_factory, spec):
    dense = load_weights(tiny_model_factory("llama"))
    expected = {n: fake_quantize(t, QuantScheme.parse(spec)) for n, t in dense.tensors.items()
                if n.endswith("_proj.weight")}
    quantized = quantize_weights_rtn(dense, QuantScheme.parse(spec))
    for name, w in expected.items():
        qw = quantized.quantized_linear(name.removesuffix(".weight"))
        torch.testing.assert_close(qw.dequantize(), w, rtol=0, atol=1e-6)


def _prompt_logprobs(llm: LLM, prompt: list[int]) -> torch.Tensor:
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    return torch.tensor([next(iter(lp.values())).logprob for lp in out.prompt_logprobs[1:]])


def test_online_quantized_llm_matches_its_fake_quantized_dense_checkpoint(
        tiny_model_factory, tmp_path):
    from safetensors.torch import save_file

    path = tiny_model_factory("llama")
    scheme = QuantScheme.parse("w4a16-g32")
    dense = load_weights(path)
    fake = {n: fake_quantize(t, scheme) if n.endswith("_proj.weight") else t
            for n, t in dense.tensors.items()}
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file({n: t.contiguous() for n, t in fake.items()}, str(tmp_path / "model.safetensors"))
    prompt = [7, 8, 9, 10, 11, 12, 13, 14]
    online = _prompt_logprobs(LLM(path, engine="torch", num_kv_blocks=256,
                                  quantization="w4a16-g32"), prompt)
    offline = _prompt_logprobs(LLM(tmp_path, engine="torch", num_kv_blocks=256), prompt)
    unquantized = _prompt_logprobs(LLM(path, engine="torch", num_kv_blocks=256), prompt)
    torch.testing.assert_close(online, offline, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(online, unquantized, atol=1e-4)  # quantization did happen


def test_serve_cli_with_dummy_weights_and_online_quantization_answers(tiny_model_factory):
    from openai import OpenAI

    port = free_port()
    cmd = [sys.executable, "-m", "twinfer.cli", "serve", str(tiny_model_factory("llama")),
           "--load-format", "dummy", "--quantization", "w8a8", "--engine", "torch",
           "--num-kv-blocks", "256", "--port", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"server exited: {server.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail("server did not become healthy in 120 s")
            time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        done = client.completions.create(model=client.models.list().data[0].id,
                                         prompt=[3, 4, 5], max_tokens=5,
                                         extra_body={"ignore_eos": True})
        assert done.usage.completion_tokens == 5 and done.usage.prompt_tokens == 3
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_quantization_scheme_names_parse_with_common_defaults():
    assert QuantScheme.parse("w4a16") == QuantScheme(4, 128, False, 16)
    assert QuantScheme.parse("w4a16-g64-sym") == QuantScheme(4, 64, True, 16)
    assert QuantScheme.parse("w8a16") == QuantScheme(8, -1, True, 16)
    assert QuantScheme.parse("w8a8") == QuantScheme(8, -1, True, 8)
    with pytest.raises(ValueError, match="must look like w4a16"):
        QuantScheme.parse("int4")


def test_online_quantization_of_a_quantized_checkpoint_is_an_error(tiny_model_factory):
    quantized = quantize_weights_rtn(load_weights(tiny_model_factory("llama")),
                                     QuantScheme.parse("w8a16"))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_weights_rtn(quantized, QuantScheme.parse("w4a16-g32"))


def test_online_quantization_group_size_error_names_the_layer(tiny_model_factory):
    with pytest.raises(ValueError, match=r"model\.layers\.\d+\.\w+\.\w+_proj: in_features \d+ "
                       "is not a multiple of group size 48"):
        quantize_weights_rtn(load_weights(tiny_model_factory("llama")),
                             QuantScheme.parse("w4a16-g48"))
