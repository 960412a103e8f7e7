"""Every family of the configurable decoder against transformers (tests/models/zoo_harness.py):
a tiny random checkpoint per config variant, paged logits in mixed batches and greedy tokens.
Variants pick what breaks naive code: head_dim != hidden / heads, one kv head, a sliding window
shorter than the prompts, tied and untied embeddings, biases."""

from __future__ import annotations

import pytest

from tests.models.zoo_harness import check_greedy, check_paged_logits, make_runner, make_tiny_model

# case id -> (transformers config class, config overrides)
CASES = {
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen2-window-1kv": (
        "Qwen2Config",
        dict(num_key_value_heads=1, use_sliding_window=True, sliding_window=8, max_window_layers=1,
             tie_word_embeddings=True),
    ),
    "qwen3-head-dim": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),
    "qwen3-bias-tied": ("Qwen3Config", dict(attention_bias=True, tie_word_embeddings=True)),
    "mistral-window": ("MistralConfig", dict(sliding_window=8, tie_word_embeddings=False)),
    "mistral-no-window": ("MistralConfig", dict(sliding_window=None, head_dim=24)),
}  # fmt: skip
GREEDY_CASES = ["qwen2", "qwen3-head-dim", "mistral-window"]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    config_class, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, make_tiny_model(path, config_class, **overrides)


def test_paged_logits_match_transformers(case):
    _, path, hf = case
    check_paged_logits(hf, make_runner(path))


def test_greedy_tokens_equal_hf_generate(case):
    name, path, hf = case
    if name not in GREEDY_CASES:
        pytest.skip("greedy decoding is checked on one variant per family")
    check_greedy(hf, path)
