"""The engine seed makes unseeded sampling repeat run to run; `model` may be an os.PathLike.
Checked on a tiny random Llama (flat distributions, so temperature 1 really samples)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from paphos import LLM, SamplingParams

PROMPTS = [{"prompt_token_ids": [5, 9, 17, 33]}, {"prompt_token_ids": [40, 41]}]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).float().save_pretrained(path)
    return path


def _sample(model, seed: int | None = None, request_seed: int | None = None) -> list[list[int]]:
    kwargs = dict(dtype="float32", skip_tokenizer_init=True, kv_cache_space=0.01, device="cpu")
    if seed is not None:
        kwargs["seed"] = seed
    llm = LLM(model=model, **kwargs)
    sampling = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=request_seed)
    outputs = llm.generate(PROMPTS, sampling, use_tqdm=False)
    llm.engine.shutdown()
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_same_engine_seed_gives_same_tokens_and_another_seed_differs(tiny_llama) -> None:
    first = _sample(str(tiny_llama), seed=0)
    assert _sample(str(tiny_llama), seed=0) == first
    assert _sample(str(tiny_llama), seed=1) != first


def test_request_seed_still_decides_its_samples(tiny_llama) -> None:
    by_request = _sample(str(tiny_llama), seed=0, request_seed=3)
    assert _sample(str(tiny_llama), seed=1, request_seed=3) == by_request


def test_model_may_be_a_pathlib_path(tiny_llama) -> None:
    assert _sample(Path(tiny_llama), seed=0) == _sample(str(tiny_llama), seed=0)
