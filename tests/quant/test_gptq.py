"""GPTQ checkpoints (AutoGPTQ v1 and gptqmodel v2 layouts, written here from the format's
description by round-to-nearest): a tiny Llama in GPTQ gives the logits and greedy tokens of the
same model with the dequantized weights, with and without act-order (g_idx), 4 and 8 bits, at
TP=1 and TP=2; unsupported settings fail at start-up naming their field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from paphos import LLM, SamplingParams
from paphos.config import EngineConfig

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ENGINE = dict(dtype="float32", skip_tokenizer_init=True, kv_cache_space=0.01, device="cpu")
PROMPT = list(range(5, 29))


def _pack(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Pack `bits`-bit values along `axis` into int32, the lowest bits first."""
    pack = 32 // bits
    values = np.moveaxis(values.astype(np.uint32), axis, 0)
    packed = np.zeros((values.shape[0] // pack, *values.shape[1:]), dtype=np.uint32)
    for k in range(pack):
        packed |= values[k::pack] << np.uint32(bits * k)
    return np.moveaxis(packed, 0, axis).view(np.int32)


def gptq_quantize(weight: torch.Tensor, bits: int, group_size: int, desc_act: bool, v1: bool, seed):
    """(tensors of one GPTQ linear, its dequantized weight [out, in]). Act-order permutes the
    inputs by a permutation drawn from `seed`: layers fed the same input (q/k/v, gate/up) share
    it, as GPTQ's Hessian of that input orders them alike (the fused layer keeps one g_idx)."""
    out_features, in_features = weight.shape
    maxq = 2**bits - 1
    group = in_features if group_size == -1 else group_size
    permutation = np.random.default_rng(seed).permutation(in_features)
    order = permutation if desc_act else np.arange(in_features)
    g_idx = np.empty(in_features, dtype=np.int32)
    g_idx[order] = np.arange(in_features) // group
    w = weight.T.numpy().astype(np.float64)  # [in, out]
    groups = in_features // group
    scales = np.empty((groups, out_features), dtype=np.float16)
    zeros = np.empty((groups, out_features), dtype=np.int64)
    q = np.empty((in_features, out_features), dtype=np.int64)
    for g in range(groups):
        rows = g_idx == g
        low, high = w[rows].min(0), w[rows].max(0)
        scale = np.maximum((high - low) / maxq, 1e-6).astype(np.float16)
        zero = np.clip(np.round(-low / scale), 1, maxq)  # >= 1: v1 stores zero - 1
        scales[g], zeros[g] = scale, zero
        q[rows] = np.clip(np.round(w[rows] / scale.astype(np.float64) + zero), 0, maxq)
    dequantized = scales[g_idx].astype(np.float32) * (q - zeros[g_idx]).astype(np.float32)
    tensors = {
        "qweight": _pack(q, bits, 0),
        "qzeros": _pack(zeros - 1 if v1 else zeros, bits, 1),
        "scales": scales,
        "g_idx": g_idx,
    }
    return {
        k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()
    }, torch.from_numpy(np.ascontiguousarray(dequantized.T))


def write_gptq(source: Path, target: Path, dense: Path, bits, group_size, desc_act, v1) -> None:
    """target: `source` as a GPTQ checkpoint; dense: the same model with dequantized weights."""
    inputs = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2}
    for path in (target, dense):
        shutil.copytree(source, path)
        for f in path.glob("*.safetensors"):
            f.unlink()
    state = load_file(str(source / "model.safetensors"))
    packed, plain = {}, {}
    for name, tensor in state.items():
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if module not in LINEARS:
            packed[name] = plain[name] = tensor
            continue
        layer = int(name.split(".")[2])
        seed = 10 * layer + inputs.get(module, 3)  # one permutation per layer input
        parts, dequantized = gptq_quantize(tensor.float(), bits, group_size, desc_act, v1, seed)
        prefix = name[: -len(".weight")]
        packed |= {f"{prefix}.{k}": v for k, v in parts.items()}
        plain[name] = dequantized
    save_file(packed, str(target / "model.safetensors"))
    save_file(plain, str(dense / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": False,
        "checkpoint_format": "gptq" if v1 else "gptq_v2",
    }
    (target / "config.json").write_text(json.dumps(config))


def _logprobs(path: Path, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=1, logprobs=1)
    with LLM(model=str(path), **ENGINE, **kwargs) as llm:
        out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
    prompt = [e[PROMPT[i]].logprob for i, e in enumerate(out.prompt_logprobs) if e]
    return out.outputs[0].token_ids, prompt


@pytest.mark.parametrize(
    "bits, group_size, desc_act, v1",
    [(4, 32, False, True), (4, 32, True, True), (8, -1, False, False), (4, 64, True, False)],
    ids=["4bit-g32", "4bit-g32-act-order", "8bit-per-channel-v2", "4bit-g64-act-order-v2"],
)
def test_gptq_model_equals_its_dequantized_weights(
    tiny_llama_dir, tmp_path, bits, group_size, desc_act, v1
):
    target, dense = tmp_path / "gptq", tmp_path / "dense"
    write_gptq(tiny_llama_dir, target, dense, bits, group_size, desc_act, v1)
    assert EngineConfig.from_kwargs(model=str(target)).model.quant_method == "gptq"
    tokens, prompt = _logprobs(target)
    want_tokens, want_prompt = _logprobs(dense)
    assert tokens == want_tokens
    np.testing.assert_allclose(prompt, want_prompt, atol=1e-4, rtol=0)
    if desc_act and v1:  # act-order with row-parallel shards: every rank keeps all groups
        tp_tokens, tp_prompt = _logprobs(target, tensor_parallel_size=2)
        assert tp_tokens == want_tokens
        np.testing.assert_allclose(tp_prompt, want_prompt, atol=1e-4, rtol=0)


def test_unsupported_gptq_settings_fail_naming_their_field(tiny_llama_dir, tmp_path):
    target = tmp_path / "gptq3"
    write_gptq(tiny_llama_dir, target, tmp_path / "dense3", 4, 32, False, True)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'gptq' \(3-bit\).*quantization_config.bits"):
        EngineConfig.from_kwargs(model=str(target))
    config["quantization_config"] |= {"bits": 4, "checkpoint_format": "marlin"}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="checkpoint_format='marlin'"):
        EngineConfig.from_kwargs(model=str(target))
