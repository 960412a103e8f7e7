"""GGUFLinearMethod: layers keep GGUF blocks; `apply` equals dequantize-then-matmul for every type
and batch size (one part or several types in one fused layer); embeddings look rows up from the
blocks; a tiny quantized Llama kept quantized gives the logits and greedy tokens of the same file
dequantized at load, at TP=1 and TP=2; start-up selection and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from gguf_blocks import ALL_TYPES, random_blocks, write_tiny_quantized_llama

from paphos import LLM, SamplingParams
from paphos.config import EngineConfig, default_model_path
from paphos.gguf_file import GGUFQuantizedTensor
from paphos.layers.embedding import VocabParallelEmbedding
from paphos.layers.linear import QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from paphos.parallel import ParallelInfo
from paphos.quant import gguf as gguf_method
from paphos.quant.gguf import GGUFLinearMethod, reference_apply, reference_apply_q8
from paphos.serve.cli import build_parser

T = GGMLQuantizationType
ATOL = 1e-4  # fp32 products of <= 512 terms of magnitude <= ~1


def _packed(ggml_type, rows, cols, seed):
    blocks = random_blocks(ggml_type, rows, cols, np.random.default_rng(seed))
    values = torch.from_numpy(dequantize(blocks, ggml_type).reshape(rows, cols))
    return GGUFQuantizedTensor(ggml_type, torch.from_numpy(blocks), (rows, cols)), values


def _loaded(layer):
    layer.linear_method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("num_tokens", [1, 4, 19])
def test_apply_equals_dequantize_then_matmul(ggml_type, num_tokens):
    layer = ReplicatedLinear(256, 48, bias=True, linear_method=GGUFLinearMethod())
    packed, values = _packed(ggml_type, 48, 256, int(ggml_type))
    layer.weight.weight_loader(layer.weight, packed)
    layer.bias.data.normal_()
    _loaded(layer)
    x = torch.randn(num_tokens, 256)
    expected = x.double() @ values.double().T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        reference_apply(layer, x, layer.bias).double(), expected, atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("ggml_type", [T.Q4_1, T.Q6_K], ids=lambda t: t.name)
def test_bf16_activations_of_a_batch_stay_within_bf16_rounding(ggml_type):
    layer = ReplicatedLinear(256, 48, linear_method=GGUFLinearMethod())
    packed, values = _packed(ggml_type, 48, 256, 9)
    layer.weight.weight_loader(layer.weight, packed)
    _loaded(layer)
    x = torch.randn(40, 256).to(torch.bfloat16)
    got = layer(x)
    assert got.dtype == torch.bfloat16
    expected = x.double() @ values.double().T
    torch.testing.assert_close(got.double(), expected, atol=0.02 * expected.abs().max(), rtol=0.02)


@pytest.fixture
def q8_on(monkeypatch):
    gguf_method.q8_activations.cache_clear()
    monkeypatch.setenv(gguf_method.Q8_ACTIVATIONS_ENV, "1")
    yield
    gguf_method.q8_activations.cache_clear()


def test_16_bit_batches_keep_exact_activations_by_default(monkeypatch):
    """Off by default: a bf16 batch of 8 rows is the exact (fp32-activation) product."""
    gguf_method.q8_activations.cache_clear()
    monkeypatch.delenv(gguf_method.Q8_ACTIVATIONS_ENV, raising=False)
    layer = ReplicatedLinear(256, 48, linear_method=GGUFLinearMethod())
    packed, _ = _packed(T.Q4_1, 48, 256, 7)
    layer.weight.weight_loader(layer.weight, packed)
    _loaded(layer)
    x = torch.randn(8, 256).to(torch.bfloat16)
    expected = reference_apply(layer, x).double()
    torch.testing.assert_close(layer(x).double(), expected, atol=1e-5, rtol=2**-7)
    gguf_method.q8_activations.cache_clear()


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("num_tokens", [1, 4, 5, 8, 33])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_activations_equal_the_8_bit_activation_reference(
    q8_on, ggml_type, num_tokens, dtype
):
    """With PAPHOS_GGUF_Q8_ACTIVATIONS=1, bf16/fp16 batches of more than 4 rows are quantized to
    8 bits per 32 (llama.cpp's integer products): the output is that reference's, rounded once to
    the activation dtype. Up to 4 rows (what the fused decode layer takes) the activations stay
    fp32, as there."""
    layer = ReplicatedLinear(256, 48, bias=True, linear_method=GGUFLinearMethod())
    packed, values = _packed(ggml_type, 48, 256, int(ggml_type) + 1)
    layer.weight.weight_loader(layer.weight, packed)
    layer.bias.data.normal_()
    _loaded(layer)
    x = torch.randn(num_tokens, 256).to(dtype)
    got = layer(x)
    assert got.dtype == dtype
    oracle = reference_apply_q8 if num_tokens > 4 else reference_apply
    expected = oracle(layer, x, layer.bias).double()
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=2**-7)


def test_a_16_bit_models_layer_quantizes_fp32_activations_too(q8_on):
    """With 8-bit activations on, the LM head of a bf16 model gets fp32 hidden states (for fp32
    logits): still 8-bit activations, fp32 out; an fp32 model's layer stays exact."""
    packed, values = _packed(T.Q8_0, 40, 256, 3)
    x = torch.randn(6, 256).to(torch.bfloat16).float()
    for params_dtype in (torch.bfloat16, torch.float32):
        layer = ReplicatedLinear(
            256, 40, linear_method=GGUFLinearMethod(), params_dtype=params_dtype
        )
        layer.weight.weight_loader(layer.weight, packed)
        _loaded(layer)
        got = layer(x)
        assert got.dtype == torch.float32
        oracle = reference_apply_q8 if params_dtype == torch.bfloat16 else reference_apply
        torch.testing.assert_close(got, oracle(layer, x).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_tokens", [2, 7])
def test_a_fused_qkv_of_two_types_keeps_one_part_per_type(num_tokens):
    layer = QKVParallelLinear(256, 64, 4, 2, linear_method=GGUFLinearMethod())
    parts = {}
    for shard, ggml_type, rows in (("q", T.Q4_K, 256), ("k", T.Q4_K, 128), ("v", T.Q6_K, 128)):
        packed, parts[shard] = _packed(ggml_type, rows, 256, rows + len(shard))
        layer.weight.weight_loader(layer.weight, packed, shard)
    _loaded(layer)
    assert [(p.row_start, p.rows, p.ggml_type) for p in layer.gguf_parts] == [
        (0, 384, T.Q4_K),
        (384, 128, T.Q6_K),
    ]
    x = torch.randn(num_tokens, 256)
    weight = torch.cat([parts["q"], parts["k"], parts["v"]])
    torch.testing.assert_close(layer(x), x @ weight.T, atol=ATOL, rtol=0)


def test_row_parallel_shards_cut_along_whole_blocks():
    packed, values = _packed(T.Q4_K, 32, 1024, 3)
    for rank in (0, 1):
        layer = RowParallelLinear(
            1024, 32, linear_method=GGUFLinearMethod(), parallel=ParallelInfo(rank, 2)
        )
        layer.weight.weight_loader(layer.weight, packed)
        _loaded(layer)
        x = torch.randn(3, 512)
        torch.testing.assert_close(
            layer.linear_method.apply(layer, x),
            x @ values[:, rank * 512 : (rank + 1) * 512].T,
            atol=ATOL,
            rtol=0,
        )
    with pytest.raises(ValueError, match="whole blocks of 256"):
        layer = RowParallelLinear(
            256, 32, linear_method=GGUFLinearMethod(), parallel=ParallelInfo(1, 2)
        )
        layer.weight.weight_loader(layer.weight, _packed(T.Q4_K, 32, 256, 4)[0])


def test_embedding_rows_are_dequantized_on_lookup_and_padding_is_zero():
    layer = VocabParallelEmbedding(100, 64, linear_method=GGUFLinearMethod())
    packed, values = _packed(T.Q8_0, 100, 64, 5)
    layer.weight.weight_loader(layer.weight, packed)
    _loaded(layer)
    assert layer.gguf_parts[0].rows == 128  # padded to a multiple of 64 with zero blocks
    ids = torch.tensor([[0, 99], [42, 7]])
    torch.testing.assert_close(layer(ids), values[ids].to(layer.params_dtype))
    x = torch.randn(2, 64)
    logits = layer.linear_method.apply(layer, x)  # as the (tied) LM head
    torch.testing.assert_close(logits[:, :100], x @ values.T, atol=ATOL, rtol=0)
    assert (logits[:, 100:] == 0).all()


# ---- a tiny Llama in a mix of GGUF types ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_quantized_gguf(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("gguf") / "tiny-q.gguf")
    write_tiny_quantized_llama(path)
    return path


ENGINE = dict(dtype="float32", skip_tokenizer_init=True, kv_cache_space=0.01, device="cpu")
PROMPT = torch.randint(3, 96, (40,), generator=torch.Generator().manual_seed(0)).tolist()


def _run(path: str, quantization: str, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=1, logprobs=1)
    with LLM(model=path, quantization=quantization, **ENGINE, **kwargs) as llm:
        assert llm.engine.config.model.quant_method == (None if quantization == "none" else "gguf")
        runner = getattr(llm.engine.executor, "runner", None)
        if runner is not None and quantization != "none":  # the F16 LM head is a dense part
            assert [p.ggml_type for p in runner.model.lm_head.gguf_parts] == [None]
        return llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]


def _prompt_logprobs(out) -> list[float]:
    return [entry[PROMPT[i]].logprob for i, entry in enumerate(out.prompt_logprobs) if entry]


@pytest.fixture(scope="module")
def dequantized_run(tiny_quantized_gguf):
    return _run(tiny_quantized_gguf, "none")


@pytest.fixture(scope="module")
def kept_run(tiny_quantized_gguf):
    return _run(tiny_quantized_gguf, "auto")


def test_kept_quantized_model_gives_the_dequantized_models_logits_and_tokens(
    kept_run, dequantized_run
):
    assert kept_run.outputs[0].token_ids == dequantized_run.outputs[0].token_ids
    np.testing.assert_allclose(
        _prompt_logprobs(kept_run), _prompt_logprobs(dequantized_run), atol=1e-3, rtol=0
    )


def test_tp2_kept_quantized_equals_tp1(tiny_quantized_gguf, kept_run):
    two = _run(tiny_quantized_gguf, "gguf", tensor_parallel_size=2)
    assert two.outputs[0].token_ids == kept_run.outputs[0].token_ids
    np.testing.assert_allclose(_prompt_logprobs(two), _prompt_logprobs(kept_run), atol=1e-4, rtol=0)
    logprobs = [next(iter(entry.values())).logprob for entry in two.outputs[0].logprobs]
    want = [next(iter(entry.values())).logprob for entry in kept_run.outputs[0].logprobs]
    np.testing.assert_allclose(logprobs, want, atol=1e-4, rtol=0)


# ---- selection ---------------------------------------------------------------------------------


def test_cli_has_a_short_quantization_flag():
    parser, _ = build_parser()
    assert parser.parse_args(["run", "-q", "none"]).quantization == "none"
    assert parser.parse_args(["run"]).quantization == "auto"


def test_an_unsupported_gguf_type_fails_at_start_up_naming_it(tmp_path):
    path = str(tmp_path / "iq2.gguf")
    writer = GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 66), np.uint8), raw_dtype=T.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from paphos.quantization import resolve_quant_method

    with pytest.raises(ValueError, match=r"IQ2_XXS.*token_embd.weight.*supported GGUF types: Q4_0"):
        resolve_quant_method("auto", path, path, None, "cpu")
    assert resolve_quant_method("none", path, path, None, "cpu") is None
    with pytest.raises(ValueError, match="CPU only"):
        resolve_quant_method("gguf", path, path, None, "cuda")


def test_a_quantized_hf_checkpoint_fails_at_start_up_naming_its_field(tiny_llama_dir, tmp_path):
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "bits": 4}
    (tiny_llama_dir / "config.json").write_text(json.dumps(config))
    try:
        with pytest.raises(
            ValueError, match=r"'bitsandbytes' \(4-bit\).*quantization_config.quant_method"
        ):
            EngineConfig.from_kwargs(model=str(tiny_llama_dir))
    finally:
        del config["quantization_config"]
        (tiny_llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not a GGUF file"):
        EngineConfig.from_kwargs(model=str(tiny_llama_dir), quantization="gguf")


# ---- runtime quantization of a float checkpoint into GGUF blocks (-q q8_0 ...) ----------------


@pytest.mark.parametrize("ggml_type", [T.Q8_0, T.Q4_1], ids=lambda t: t.name)
def test_runtime_quantization_applies_the_gguf_packages_blocks(ggml_type):
    layer = ReplicatedLinear(64, 40, linear_method=GGUFLinearMethod(quantize_to=ggml_type))
    dense = torch.randn(40, 64)
    layer.weight.weight_loader(layer.weight, dense)
    _loaded(layer)
    assert [p.ggml_type for p in layer.gguf_parts] == [ggml_type]
    values = torch.from_numpy(dequantize(quantize(dense.numpy(), ggml_type), ggml_type))
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ values.reshape(40, 64).T, atol=ATOL, rtol=0)


def test_q8_0_at_load_stays_close_to_the_float_model(tiny_llama_dir):
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    prompt = {"prompt_token_ids": PROMPT[:24]}
    runs = {}
    for quantization in ("none", "q8_0"):
        with LLM(model=str(tiny_llama_dir), quantization=quantization, **ENGINE) as llm:
            runs[quantization] = llm.generate(prompt, params, use_tqdm=False)[0]
            model = llm.engine.executor.runner.model
            if quantization == "q8_0":
                down = model.model.layers[0].mlp.down_proj
                assert [p.ggml_type for p in down.gguf_parts] == [T.Q8_0]
    got, want = (
        [e[PROMPT[i]].logprob for i, e in enumerate(runs[q].prompt_logprobs) if e]
        for q in ("q8_0", "none")
    )
    np.testing.assert_allclose(got, want, atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="quantizes float checkpoints"):
        EngineConfig.from_kwargs(model=default_model_path(), quantization="q8_0")
