"""compressed-tensors (llm-compressor) checkpoints of a tiny Llama, written by the format's own
tools (tests/quant/ct_checkpoints.py): each layer's `apply` equals compressed-tensors' own
dequantized weight times its own fake-quantized input; the model's logprobs equal transformers'
forward on the same checkpoint (which decompresses it and fake-quantizes activations the same
way) and its greedy tokens transformers' `generate`; weight-only schemes also equal the
dequantized-weights model exactly; TP=2 equals TP=1. `quant_method: fp8` checkpoints (the same
weights renamed into DeepSeek's `weight_scale_inv` blocks / per-tensor scales) equal their
compressed-tensors twins."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

pytest.importorskip("compressed_tensors", reason="compressed-tensors writes these checkpoints")

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
import hf_compare  # noqa: E402
from ct_checkpoints import SCHEMES, has_llmcompressor, write_compressed  # noqa: E402
from test_gptq import ENGINE, PROMPT  # noqa: E402

from paphos import LLM, SamplingParams  # noqa: E402
from paphos.config import EngineConfig  # noqa: E402

WEIGHT_ONLY = ("w4a16-g32-sym", "w4a16-g32-asym", "w4a16-channel-asym", "w8a16-g32")
# transformers 5.24 with compressed-tensors 0.20 cannot load asymmetric pack-quantized zero
# points (it expects them unpacked: "MISMATCH ... ckpt [8, 2] vs model [64, 2]")
HF_CANNOT_LOAD = ("w4a16-g32-asym", "w4a16-channel-asym")
# int8 activations: a 1-ulp difference upstream (fused RMSNorm, summation order) can move an
# element across a rounding boundary, a step of amax / 127.5: logprobs then differ by ~1e-3
INT8_ACTS_ATOL = 5e-3


@pytest.fixture(scope="module")
def checkpoints(tiny_llama_dir, tmp_path_factory):
    """scheme -> (compressed checkpoint, dense twin), written once per module; the source is
    the shared tiny Llama with its tokenizer (llmcompressor's calibration data needs it)."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(scheme: str, gptq: bool = False) -> tuple[Path, Path]:
        key = scheme + ("-gptq" if gptq else "")
        if key not in made:
            root = tmp_path_factory.mktemp(key)
            write_compressed(tiny_llama_dir, root / "ct", root / "dense", scheme, gptq)
            made[key] = (root / "ct", root / "dense")
        return made[key]

    return get


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logprobs(path: Path, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=8, prompt_logprobs=1)
    with LLM(model=str(path), **ENGINE, **kwargs) as llm:
        out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
    prompt = [e[PROMPT[i]].logprob for i, e in enumerate(out.prompt_logprobs) if e]
    return out.outputs[0].token_ids, np.array(prompt)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_apply_equals_compressed_tensors_dequantize_then_matmul(checkpoints, scheme):
    """Per layer: our dequantized weight is compressed-tensors' (the dense twin holds what its
    fake_quantize gives), and apply(x) = its fake-quantized x @ that weight.T."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    ct_path, dense_path = checkpoints(scheme)
    runner = hf_compare.build_runner(ct_path)
    dense = load_file(str(dense_path / "model.safetensors"))
    acts = SCHEMES[scheme].get("input_activations")
    layer = runner.model.model.layers[0]
    for module, names in (
        (layer.self_attn.qkv_proj, ("q_proj", "k_proj", "v_proj")),
        (layer.mlp.down_proj, ("down_proj",)),
    ):
        prefix = "model.layers.0." + ("mlp." if names[0] == "down_proj" else "self_attn.")
        want = torch.cat([dense[f"{prefix}{n}.weight"] for n in names])  # [out, in]
        method = module.linear_method
        torch.testing.assert_close(method.dequantize(module), want, rtol=0, atol=0)
        in_features = want.shape[1]
        x = torch.randn(7, in_features, generator=torch.Generator().manual_seed(1))
        if acts is not None:
            args = QuantizationArgs(**acts)
            # [1, 7, in]: compressed-tensors' "token" keeps dims 0 and 1; its groups need whole
            # groups (zero padding leaves every amax as it is)
            tokens = F.pad(x, (0, -in_features % (acts.get("group_size") or 1))).unsqueeze(0)
            scale, zero = compute_dynamic_scales_and_zp(tokens, args, module=None)
            x_seen = fake_quantize(tokens, scale, zero, args)[0, :, :in_features]
        else:
            x_seen = x
        got = method.apply(module, x)
        torch.testing.assert_close(got, x_seen @ want.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s != "fp8-block-128"])
def test_model_equals_transformers_and_its_dequantized_weights(checkpoints, scheme):
    ct_path, dense_path = checkpoints(scheme)
    assert EngineConfig.from_kwargs(model=str(ct_path)).model.quant_method == "compressed-tensors"
    if scheme in WEIGHT_ONLY:  # exactly the dense model with compressed-tensors' weights
        tokens, prompt = _logprobs(ct_path)
        want_tokens, want_prompt = _logprobs(dense_path)
        assert tokens == want_tokens
        np.testing.assert_allclose(prompt, want_prompt, atol=1e-5, rtol=0)
    if scheme in HF_CANNOT_LOAD:
        return
    hf = _hf(ct_path)
    atol = INT8_ACTS_ATOL if scheme == "w8a8-int8" else hf_compare.LOGPROB_ATOL
    hf_compare.check_mixed_batch(hf, hf_compare.build_runner(ct_path), atol=atol)
    hf_compare.check_greedy(ct_path, hf)


def test_fp8_block_128_partial_blocks(checkpoints):
    """128x128 blocks on a 64-wide model: every scale covers a partial block (transformers'
    compressed-tensors forward cannot group 64 activations by 128, so the oracle is the 32x32
    checkpoint's path: the dense twin within fp8 activation noise, greedy tokens equal)."""
    ct_path, dense_path = checkpoints("fp8-block-128")
    tokens, prompt = _logprobs(ct_path)
    want_tokens, want_prompt = _logprobs(dense_path)
    assert tokens == want_tokens
    np.testing.assert_allclose(prompt, want_prompt, atol=0.05, rtol=0)


@pytest.mark.skipif(not has_llmcompressor(), reason="GPTQ checkpoints need llmcompressor")
@pytest.mark.parametrize("scheme", ["w4a16-g32-sym", "w4a16-g32-asym"])
def test_gptq_checkpoint_from_llmcompressor(checkpoints, scheme):
    ct_path, dense_path = checkpoints(scheme, gptq=True)
    tokens, prompt = _logprobs(ct_path)
    want_tokens, want_prompt = _logprobs(dense_path)
    assert tokens == want_tokens
    np.testing.assert_allclose(prompt, want_prompt, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "scheme, atol",
    [
        ("w4a16-g32-asym", 1e-5),
        ("fp8-block-32", 1e-5),
        ("w8a8-int8", INT8_ACTS_ATOL),
    ],
)
def test_tensor_parallel_equals_single_process(checkpoints, scheme, atol):
    """Column shards cut packed zero points along the output and expanded block scales; row
    shards cut packed int32 words, groups and 32-column blocks (the fp8 activations' groups
    line up with them, so fp8 is exact). Per-token int8 scales of a row-parallel layer are each
    rank's own (as in vLLM: no extra all-reduce of the row's amax), so W8A8 differs by int8
    noise: its prompt logprobs are compared, not its greedy continuation on this flat model."""
    ct_path, _ = checkpoints(scheme)
    tokens, prompt = _logprobs(ct_path)
    tp_tokens, tp_prompt = _logprobs(ct_path, tensor_parallel_size=2)
    if scheme != "w8a8-int8":
        assert tp_tokens == tokens
    np.testing.assert_allclose(tp_prompt, prompt, atol=atol, rtol=0)


def _as_fp8_checkpoint(ct_path: Path, target: Path, block: list[int] | None) -> None:
    """A compressed-tensors fp8 checkpoint as `quant_method: fp8`: the same e4m3 values, block
    scales renamed to DeepSeek's `weight_scale_inv` (multiplied, as its name hides)."""
    import shutil

    shutil.copytree(ct_path, target)
    state = load_file(str(ct_path / "model.safetensors"))
    renamed = {}
    for name, tensor in state.items():
        if name.endswith(".weight_scale") and block is not None:
            name = name.replace(".weight_scale", ".weight_scale_inv")
        elif name.endswith(".weight_scale"):
            tensor = tensor.reshape(-1)[0].clone() if tensor.numel() == 1 else tensor
        renamed[name] = tensor
    save_file(renamed, str(target / "model.safetensors"))
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    if block is not None:
        config["quantization_config"]["weight_block_size"] = block
    (target / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("scheme, block", [("fp8-block-32", [32, 32]), ("fp8-tensor", None)])
def test_fp8_checkpoint_equals_its_compressed_tensors_twin(checkpoints, tmp_path, scheme, block):
    ct_path, _ = checkpoints(scheme)
    _as_fp8_checkpoint(ct_path, tmp_path / "fp8", block)
    assert EngineConfig.from_kwargs(model=str(tmp_path / "fp8")).model.quant_method == "fp8"
    tokens, prompt = _logprobs(tmp_path / "fp8")
    want_tokens, want_prompt = _logprobs(ct_path)
    assert tokens == want_tokens
    np.testing.assert_allclose(prompt, want_prompt, atol=1e-6, rtol=0)


def _edit_config(path: Path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda q: q["config_groups"].update(group_1=q["config_groups"]["group_0"]), "2 groups"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=2), "num_bits=2"),
        (lambda q: q.update(kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme"),
        (lambda q: q.update(ignore=["lm_head", "model.layers.0.mlp.down_proj"]), "ignore"),
        (lambda q: q.update(format="marlin-24"), "format='marlin-24'"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(actorder="group"), "g_idx"),
    ],
    ids=["two-groups", "2-bit", "kv-cache-scheme", "ignored-layer", "format", "g_idx"],
)
def test_unsupported_compressed_tensors_configs_fail_naming_their_field(
    checkpoints, tmp_path, edit, message
):
    import shutil

    ct_path, _ = checkpoints("w4a16-g32-sym")
    shutil.copytree(ct_path, tmp_path / "ct")
    _edit_config(tmp_path / "ct", edit)
    if message.startswith("format"):  # the group's own format wins over the top-level one
        _edit_config(tmp_path / "ct", lambda q: q["config_groups"]["group_0"].pop("format"))
    with pytest.raises(ValueError, match=message) as error:
        EngineConfig.from_kwargs(model=str(tmp_path / "ct"))
    assert "quantization_config." in str(error.value)


def test_unsupported_fp8_config_fails_naming_its_field(checkpoints, tmp_path):
    ct_path, _ = checkpoints("fp8-tensor")
    _as_fp8_checkpoint(ct_path, tmp_path / "fp8", None)
    _edit_config(tmp_path / "fp8", lambda q: q.update(fmt="e5m2"))
    with pytest.raises(ValueError, match=r"fmt='e5m2' \(field: quantization_config.fmt"):
        EngineConfig.from_kwargs(model=str(tmp_path / "fp8"))


def test_fp8_kv_cache_scheme_loads_its_scales(checkpoints, tmp_path):
    """llm-compressor's static fp8 KV scheme: `self_attn.k_scale` / `v_scale` per layer reach
    the attention layers (tests/quant/test_kv_cache_scales.py checks what an fp8 cache does)."""
    import shutil

    from safetensors.torch import load_file, save_file

    ct_path, _ = checkpoints("w4a16-g32-sym")
    shutil.copytree(ct_path, tmp_path / "ct")
    scheme = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
    _edit_config(tmp_path / "ct", lambda q: q.update(kv_cache_scheme=scheme))
    file = next((tmp_path / "ct").glob("*.safetensors"))
    tensors = load_file(file)
    for layer in range(2):
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(0.5)
        tensors[f"model.layers.{layer}.self_attn.v_scale"] = torch.tensor(0.25)
    save_file(tensors, file, metadata={"format": "pt"})
    with LLM(model=str(tmp_path / "ct"), **ENGINE, kv_cache_dtype="fp8") as llm:
        layers = llm.engine.executor.runner.attention_layers()
        assert [(m.k_scale, m.v_scale) for m in layers] == [(0.5, 0.25)] * 2
