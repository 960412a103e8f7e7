"""FP8 KV cache (`--kv-cache-dtype fp8|fp8_e4m3|fp8_e5m2`, per-tensor scale 1.0, CPU): the
write saturates and casts, attention reads the cache upcast, so a model with an fp8 cache
equals the reference attention over K/V rounded to fp8 (checked against the same model whose
cache holds those rounded values in its own dtype); the cache holds twice bf16's tokens in the
same space; CUDA refuses it at start-up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from paphos import LLM, SamplingParams
from paphos.config import EngineConfig
from paphos.ops import kv_cache as kv_ops
from paphos.ops import paged_attention as attention_ops

ENGINE = dict(dtype="bfloat16", skip_tokenizer_init=True, kv_cache_space=0.01, device="cpu")
PROMPT = list(range(5, 29))
FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@pytest.mark.parametrize("name", list(FP8))
def test_fp8_cache_attention_equals_attention_over_rounded_kv(name):
    gen = torch.Generator().manual_seed(0)
    num_tokens, heads, kv_heads, head = 20, 4, 2, 16
    key = torch.randn(num_tokens, kv_heads, head, generator=gen) * 3
    key[0, 0, 0] = 1e6  # past e4m3's 448 and e5m2's 57344: saturated, not NaN
    value = torch.randn(num_tokens, kv_heads, head, generator=gen)
    query = torch.randn(num_tokens, heads, head, generator=gen)
    slots = torch.arange(num_tokens)
    caches = {}
    for dtype in (FP8[name], torch.float32):
        caches[dtype] = torch.zeros(2, 4, 8, kv_heads, head, dtype=dtype)  # 4 blocks of 8
    limit = torch.finfo(FP8[name]).max
    kv_ops.write_kv_cache(key, value, caches[FP8[name]], slots)
    rounded = [t.clamp(-limit, limit).to(FP8[name]).float() for t in (key, value)]
    kv_ops.write_kv_cache(*rounded, caches[torch.float32], slots)
    assert not caches[FP8[name]].float().isnan().any()
    assert caches[FP8[name]].float()[0, 0, 0, 0, 0] == limit
    args = (torch.tensor([0, num_tokens]), torch.tensor([num_tokens]), torch.tensor([[0, 1, 2, 3]]))
    got = attention_ops.paged_attention(query, caches[FP8[name]], *args, 0.25)
    want = attention_ops.paged_attention(query, caches[torch.float32], *args, 0.25)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _run(path, **kwargs):
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=8, prompt_logprobs=1)
    with LLM(model=str(path), **ENGINE, **kwargs) as llm:
        out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
        blocks = llm.engine.num_kv_blocks
    prompt = [e[PROMPT[i]].logprob for i, e in enumerate(out.prompt_logprobs) if e]
    return out.outputs[0].token_ids, np.array(prompt), blocks


def test_fp8_cache_doubles_capacity_and_keeps_the_model_close(tiny_llama_dir):
    tokens, prompt, blocks = _run(tiny_llama_dir)
    fp8_tokens, fp8_prompt, fp8_blocks = _run(tiny_llama_dir, kv_cache_dtype="fp8")
    assert fp8_blocks == 2 * blocks  # one byte per element against bf16's two
    # e4m3 keeps 3 mantissa bits of K and V; this tiny model's logprobs move by ~1e-3
    np.testing.assert_allclose(fp8_prompt, prompt, atol=2e-2, rtol=0)
    assert fp8_tokens[:4] == tokens[:4]


def test_fp8_cache_is_taken_on_cuda_and_bad_names_fail(tiny_llama_dir):
    config = EngineConfig.from_kwargs(
        model=str(tiny_llama_dir), kv_cache_dtype="fp8_e5m2", device="cuda"
    )  # the Triton kernels read fp8 caches (tests/gpu/test_fp8_kv_cache_kernels.py)
    assert config.cache.kv_cache_dtype == "fp8_e5m2"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig.from_kwargs(model=str(tiny_llama_dir), kv_cache_dtype="int4")
