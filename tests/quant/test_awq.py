"""AWQ checkpoints (AutoAWQ's GEMM layout, written here from the format's description by
round-to-nearest, with its column interleave): a tiny Llama in AWQ gives the logits and greedy
tokens of the same model with the dequantized weights, at TP=1 and TP=2 (row-parallel shards cut
groups, column shards cut packed columns)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_gptq import ENGINE, LINEARS, PROMPT

from paphos import LLM, SamplingParams
from paphos.config import EngineConfig

PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: nibble i of a pack holds column PACK_ORDER[i]


def _pack_columns(values: np.ndarray) -> np.ndarray:
    """[rows, cols] 4-bit values -> [rows, cols / 8] int32 in AWQ's interleaved order."""
    values = values.astype(np.uint32).reshape(values.shape[0], -1, 8)  # [rows, packs, 8]
    packed = np.zeros(values.shape[:2], dtype=np.uint32)
    for nibble, column in enumerate(PACK_ORDER):
        packed |= values[:, :, column] << np.uint32(4 * nibble)
    return packed.view(np.int32)


def awq_quantize(weight: torch.Tensor, group_size: int):
    out_features, in_features = weight.shape
    w = weight.T.numpy().astype(np.float64).reshape(in_features // group_size, group_size, -1)
    low, high = w.min(1), w.max(1)  # [groups, out]
    scales = np.maximum((high - low) / 15, 1e-6).astype(np.float16)
    zeros = np.clip(np.round(-low / scales), 0, 15).astype(np.int64)
    q = np.clip(np.round(w / scales[:, None].astype(np.float64) + zeros[:, None]), 0, 15)
    dequantized = scales[:, None].astype(np.float32) * (q - zeros[:, None]).astype(np.float32)
    tensors = {
        "qweight": _pack_columns(q.reshape(in_features, -1)),
        "qzeros": _pack_columns(zeros),
        "scales": scales,
    }
    dense = dequantized.reshape(in_features, out_features).T
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, (
        torch.from_numpy(np.ascontiguousarray(dense))
    )


def write_awq(source: Path, target: Path, dense: Path, group_size: int) -> None:
    for path in (target, dense):
        shutil.copytree(source, path)
        for f in path.glob("*.safetensors"):
            f.unlink()
    packed, plain = {}, {}
    for name, tensor in load_file(str(source / "model.safetensors")).items():
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if module not in LINEARS:
            packed[name] = plain[name] = tensor
            continue
        parts, plain[name] = awq_quantize(tensor.float(), group_size)
        packed |= {f"{name[: -len('.weight')]}.{k}": v for k, v in parts.items()}
    save_file(packed, str(target / "model.safetensors"))
    save_file(plain, str(dense / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
    }
    (target / "config.json").write_text(json.dumps(config))


def _run(path: Path, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=1)
    with LLM(model=str(path), **ENGINE, **kwargs) as llm:
        out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
    return out.outputs[0].token_ids, [
        e[PROMPT[i]].logprob for i, e in enumerate(out.prompt_logprobs) if e
    ]


def test_awq_model_equals_its_dequantized_weights_at_tp1_and_tp2(tiny_llama_dir, tmp_path):
    target, dense = tmp_path / "awq", tmp_path / "dense"
    write_awq(tiny_llama_dir, target, dense, group_size=32)
    assert EngineConfig.from_kwargs(model=str(target)).model.quant_method == "awq"
    want_tokens, want = _run(dense)
    for tp in (1, 2):
        tokens, got = _run(target, tensor_parallel_size=tp)
        assert tokens == want_tokens
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_awq_versions_other_than_gemm_fail_naming_their_field(tiny_llama_dir, tmp_path):
    target = tmp_path / "awq-gemv"
    write_awq(tiny_llama_dir, target, tmp_path / "dense-gemv", group_size=32)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantization_config.version"):
        EngineConfig.from_kwargs(model=str(target))
