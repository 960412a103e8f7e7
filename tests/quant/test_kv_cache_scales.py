"""Checkpoint KV cache scales (compressed-tensors' `self_attn.k_scale` / `v_scale`, older FP8
files' `self_attn.kv_scale` or `k_proj.output_scale` / `v_proj.output_scale`): each reaches its
layer's Attention (also read, unused, by a bf16 cache), an fp8 cache stores K / k_scale and
V / v_scale and reads them back times the scale, query scales are skipped, and malformed scales
fail naming the tensor."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from paphos import LLM, SamplingParams
from paphos.attention.layer import Attention
from paphos.attention.metadata import AttentionMetadata

ENGINE = dict(dtype="bfloat16", skip_tokenizer_init=True, kv_cache_space=0.01, device="cpu")
PROMPT = list(range(5, 29))
NUM_LAYERS = 2  # tests/conftest.py's tiny Llama


def _with_scales(src: Path, dst: Path, scales: dict[str, float]) -> Path:
    """A copy of the checkpoint with, per layer, the tensors `self_attn.<suffix>` = value."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for layer in range(NUM_LAYERS):
        for suffix, value in scales.items():
            tensors[f"model.layers.{layer}.self_attn.{suffix}"] = torch.tensor(value * (layer + 1))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _run(path: Path, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=6, min_tokens=6, prompt_logprobs=1)
    with LLM(model=str(path), **ENGINE, **kwargs) as llm:
        out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
        runner = llm.engine.executor.runner
        scales = [(m.k_scale, m.v_scale) for m in runner.attention_layers()]
    prompt = [e[PROMPT[i]].logprob for i, e in enumerate(out.prompt_logprobs) if e]
    return np.array(prompt), scales


@pytest.mark.parametrize(
    "names, want",
    [
        ({"k_scale": 0.25, "v_scale": 0.5}, [(0.25, 0.5), (0.5, 1.0)]),
        ({"kv_scale": 0.25}, [(0.25, 0.25), (0.5, 0.5)]),
        ({"k_proj.output_scale": 0.25, "v_proj.output_scale": 0.5, "q_scale": 3.0},
         [(0.25, 0.5), (0.5, 1.0)]),
    ],
    ids=["compressed-tensors", "kv_scale", "output_scale"],
)  # fmt: skip
def test_checkpoint_scales_reach_each_layer(tiny_llama_dir, tmp_path, names, want):
    path = _with_scales(tiny_llama_dir, tmp_path / "scaled", names)
    prompt, scales = _run(path, kv_cache_dtype="fp8")
    assert scales == want
    plain, _ = _run(tiny_llama_dir, kv_cache_dtype="fp8")
    np.testing.assert_allclose(prompt, plain, atol=2e-2, rtol=0)  # the model stays itself


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_attention_layer_stores_kv_over_its_scales_and_reads_them_back(dtype):
    """The layer with scales on an fp8 cache == attention over the K/V the cache can hold:
    round(K / k_scale) * k_scale (and V alike; the scales join at other points of the sums);
    the cache holds K / k_scale bit for bit."""
    gen = torch.Generator().manual_seed(0)
    tokens, heads, kv_heads, head = 21, 4, 2, 16
    query, key, value = (
        torch.randn(tokens, h * head, generator=gen) for h in (heads, kv_heads, kv_heads)
    )
    key = key * 40  # past e4m3's 448 unless divided by the scale
    k_scale, v_scale = 0.37, 0.011
    layer = Attention(heads, head, 0.25, kv_heads)
    layer.set_kv_scales(k_scale, v_scale)
    metadata = AttentionMetadata(
        slot_mapping=torch.arange(tokens), query_start_loc=torch.tensor([0, 9, tokens]),
        seq_lens=torch.tensor([9, 12]), block_tables=torch.tensor([[0, 1], [2, 3]]),
        logits_indices=torch.tensor([8, 20]), max_query_len=12, max_seq_len=12,
    )  # fmt: skip
    cache = torch.zeros(2, 4, 8, kv_heads, head, dtype=dtype)
    got = layer(query, key, value, cache, metadata)
    shape = (tokens, kv_heads, head)
    stored = [(t / s).view(shape).to(dtype) for t, s in ((key, k_scale), (value, v_scale))]
    torch.testing.assert_close(
        cache[0].view(-1, kv_heads, head)[:tokens], stored[0], rtol=0, atol=0
    )
    plain = Attention(heads, head, 0.25, kv_heads)
    rounded = [t.float() * s for t, s in zip(stored, (k_scale, v_scale))]
    want = plain(query, rounded[0].view(tokens, -1), rounded[1].view(tokens, -1),
                 torch.zeros(2, 4, 8, kv_heads, head), metadata)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)  # the scales applied elsewhere


@pytest.mark.parametrize(
    "value, message",
    [(torch.tensor([0.5, 0.5]), "one scale per tensor"), (torch.tensor(-1.0), "positive")],
)
def test_malformed_scales_fail_naming_them(tiny_llama_dir, tmp_path, value, message):
    shutil.copytree(tiny_llama_dir, tmp_path / "bad")
    tensors = load_file(tmp_path / "bad" / "model.safetensors")
    tensors["model.layers.1.self_attn.k_scale"] = value
    save_file(tensors, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        _run(tmp_path / "bad", kv_cache_dtype="fp8")
