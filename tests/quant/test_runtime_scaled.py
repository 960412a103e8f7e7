"""Runtime `-q int8` / `-q fp8` on a float checkpoint: per-channel weights quantized at load;
int8 weight-only or W8A8 (dynamic per-token int8 through torch._int_mm), fp8 with dynamic
per-token activations. `apply` equals dequantize-then-matmul (with the activation quantized the
same way); the tiny Llama gives the logprobs of the same model with the dequantized weights
(exactly for weight-only int8); -q fp8 equals compressed-tensors' FP8_DYNAMIC checkpoint of
the same model."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_gptq import ENGINE, LINEARS, PROMPT

from paphos import LLM, SamplingParams
from paphos.config import EngineConfig
from paphos.layers.linear import MergedColumnParallelLinear
from paphos.ops import scaled_mm
from paphos.quant import create_linear_method
from paphos.quant.scaled import ScaledLinearMethod
from paphos.quant_schemes import runtime_scheme

MODES = {"int8": ("int8", False), "w8a8": ("int8", True), "fp8": ("fp8", False)}


def _layer(mode: str) -> tuple[MergedColumnParallelLinear, torch.Tensor]:
    name, w8a8 = MODES[mode]
    method = ScaledLinearMethod(runtime_scheme(name, w8a8))
    layer = MergedColumnParallelLinear(64, [48, 48], linear_method=method)
    dense = torch.randn(96, 64, generator=torch.Generator().manual_seed(0)) * 0.1  # [out, in]
    for index, part in enumerate(dense.split(48)):
        layer.weight.weight_loader(layer.weight, part, index)
    method.process_weights_after_loading(layer)
    return layer, dense


@pytest.mark.parametrize("mode", list(MODES))
def test_apply_equals_dequantize_then_matmul(mode):
    layer, dense = _layer(mode)
    method = layer.linear_method
    weight = method.dequantize(layer)  # [out, in] float32
    # per-row quantization: within half a step of the dense weight (fp8: 3 mantissa bits)
    step = dense.abs().amax(1, keepdim=True) / (127 if MODES[mode][0] == "int8" else 8)
    assert ((weight - dense).abs() <= step / 2 + 1e-7).all()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    seen = x if method.act is None else scaled_mm.fake_quantize_activation(x, method.act)
    torch.testing.assert_close(layer(x), seen @ weight.t(), rtol=1e-5, atol=1e-5)
    if mode == "w8a8":  # the int32 sum of torch._int_mm, not the float reference
        assert method._takes_int8_product(layer)
    assert layer.weight.dtype == (torch.int8 if MODES[mode][0] == "int8" else torch.float8_e4m3fn)


def _dequantized_twin(source, target) -> None:
    """`source` with each linear weight replaced by its per-row int8 quantized-dequantized
    value."""
    shutil.copytree(source, target)
    state = load_file(str(source / "model.safetensors"))
    for key, tensor in state.items():
        if key.endswith(".weight") and key.rsplit(".", 2)[-2] in LINEARS:
            q, scale = scaled_mm.quantize_rows_int8(tensor)
            state[key] = q.float() * scale
    save_file(state, str(target / "model.safetensors"))


def _run(path, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=8, prompt_logprobs=1)
    with LLM(model=str(path), **ENGINE, **kwargs) as llm:
        out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
    prompt = [e[PROMPT[i]].logprob for i, e in enumerate(out.prompt_logprobs) if e]
    return out.outputs[0].token_ids, np.array(prompt)


def test_runtime_int8_model_equals_its_dequantized_weights(tiny_llama_dir, tmp_path):
    """Weight-only: exactly the dequantized model. W8A8 (chosen on CUDA and on CPUs with int8
    dot products): within int8 activation noise, whose rounding flips make a greedy
    continuation of this flat random model diverge, so only the prompt logprobs are compared
    (the W8A8 product itself is checked exactly above and through compressed-tensors' W8A8)."""
    config = EngineConfig.from_kwargs(model=str(tiny_llama_dir), quantization="int8")
    assert config.model.quant_method == "runtime-int8"
    _dequantized_twin(tiny_llama_dir, tmp_path / "dense")
    tokens, prompt = _run(tiny_llama_dir, quantization="int8")
    want_tokens, want_prompt = _run(tmp_path / "dense")
    method = create_linear_method("runtime-int8", None, "cpu")
    if method.act is None:
        assert tokens == want_tokens
    np.testing.assert_allclose(prompt, want_prompt, atol=1e-5 if method.act is None else 5e-3)


def test_runtime_fp8_model_equals_compressed_tensors_fp8_dynamic(tiny_llama_dir, tmp_path):
    """-q fp8 is compressed-tensors' FP8_DYNAMIC scheme (per-channel e4m3 weights at amax / 448,
    dynamic per-token activations), made by its own tool from the same model: equal logprobs
    (that checkpoint equals transformers' forward, test_compressed_tensors) and greedy tokens."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors writes the twin")
    from ct_checkpoints import write_compressed

    write_compressed(tiny_llama_dir, tmp_path / "ct", tmp_path / "dense", "fp8-dynamic")
    tokens, prompt = _run(tiny_llama_dir, quantization="fp8")
    want_tokens, want_prompt = _run(tmp_path / "ct")
    assert tokens == want_tokens
    np.testing.assert_allclose(prompt, want_prompt, atol=1e-5, rtol=0)


def test_runtime_int8_on_the_default_gguf_file():
    """-q int8 on the default SmolLM2 Q4_1 file: its blocks dequantized at load, then quantized
    per channel. Greedy continuations of the real model leave the dense model's after a few
    tokens (notes/quant.md: 2-27 tokens for int8 weight-only, 5-13 for W8A8 in bf16), so only
    the first two are compared."""
    from paphos.config import default_model_path

    prompt = [1, 504, 3458, 282, 4649, 314, 1046, 2152, 30, 378, 3458, 282]
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=12)
    outs = {}
    for quantization in ("int8", "none"):
        kwargs = dict(ENGINE, quantization=quantization, dtype="bfloat16")
        with LLM(model=default_model_path(), **kwargs) as llm:
            assert llm.engine.config.model.quant_method == (
                "runtime-int8" if quantization == "int8" else None
            )
            out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
            outs[quantization] = out.outputs[0].token_ids
    assert outs["int8"][:2] == outs["none"][:2] and len(outs["int8"]) == 12


def test_static_input_scales_take_the_largest_over_fused_parts():
    """compressed-tensors/fp8 static activations: one input_scale per checkpoint tensor; a fused
    layer's parts share their input, so the product quantizes it once, by the largest scale
    (vLLM's rule; exact where the parts' scales are equal, as llmcompressor's observers of
    one input give)."""
    from paphos.quant_schemes import ActivationScheme, LinearScheme, WeightScheme

    acts = ActivationScheme("float", "tensor", static=True, half_range=448.0)
    method = ScaledLinearMethod(LinearScheme(WeightScheme("float"), acts))
    layer = MergedColumnParallelLinear(64, [32, 32], linear_method=method)
    gen = torch.Generator().manual_seed(7)
    q = (torch.randn(64, 64, generator=gen) * 40).to(torch.float8_e4m3fn)  # [out, in]
    for index, input_scale in enumerate((0.004, 0.01)):
        layer.weight.weight_loader(layer.weight, q[32 * index : 32 * (index + 1)], index)
        scale = torch.tensor([0.02 * (index + 1)])
        layer.weight_scale.weight_loader(layer.weight_scale, scale, index)
        layer.input_scale.weight_loader(layer.input_scale, torch.tensor(input_scale), index)
    method.process_weights_after_loading(layer)
    assert float(layer.input_scale_max) == pytest.approx(0.01)
    x = torch.randn(3, 64, generator=gen)
    seen = (x / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn).float() * 0.01
    weight = q.float() * torch.tensor([0.02] * 32 + [0.04] * 32)[:, None]
    torch.testing.assert_close(layer(x), seen @ weight.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_runtime_quantization_at_tp2_equals_tp1(tiny_llama_dir, name):
    """Each rank quantizes its own shard at load: column shards take their rows' scales, row
    shards quantize their columns per output row, so the scales differ from TP=1's there; the
    logprobs stay within the quantization noise of TP=1's and the first greedy tokens agree."""
    tokens, prompt = _run(tiny_llama_dir, quantization=name)
    tp_tokens, tp_prompt = _run(tiny_llama_dir, quantization=name, tensor_parallel_size=2)
    np.testing.assert_allclose(tp_prompt, prompt, atol=2e-2, rtol=0)
    assert tp_tokens[:4] == tokens[:4]
