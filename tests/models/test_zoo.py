"""Every family of the configurable decoder against transformers (tests/models/zoo_harness.py):
a tiny random checkpoint per config variant, paged logits in mixed batches and greedy tokens.
Variants pick what breaks naive code: head_dim != hidden / heads, one kv head, a sliding window
shorter than the prompts, tied and untied embeddings, biases."""

from __future__ import annotations

import pytest

from tests.models.zoo_harness import (
    VOCAB,
    check_greedy,
    check_paged_logits,
    make_runner,
    make_tiny_model,
)

GEMMA3_ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
}
# case id -> (transformers config class, config overrides, whether greedy decoding is checked too)
CASES = {
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False), True),
    "qwen2-window-1kv": (
        "Qwen2Config",
        dict(num_key_value_heads=1, use_sliding_window=True, sliding_window=8, max_window_layers=1,
             tie_word_embeddings=True),
        False,
    ),
    "qwen3-head-dim": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False), True),
    "qwen3-bias-tied": ("Qwen3Config", dict(attention_bias=True, tie_word_embeddings=True), False),
    "mistral-window": ("MistralConfig", dict(sliding_window=8, tie_word_embeddings=False), True),
    "mistral-no-window": ("MistralConfig", dict(sliding_window=None, head_dim=24), False),
    "gemma": ("GemmaConfig", dict(head_dim=32), True),
    "gemma-mha": ("GemmaConfig", dict(num_key_value_heads=4, tie_word_embeddings=False), False),
    "gemma2": (
        "Gemma2Config",
        dict(head_dim=32, sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
             final_logit_softcapping=5.0),
        True,
    ),
    "gemma2-1kv-untied": (
        "Gemma2Config",
        dict(num_key_value_heads=1, sliding_window=20, tie_word_embeddings=False),
        False,
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(head_dim=32, sliding_window=8, query_pre_attn_scalar=24, sliding_window_pattern=2,
             rope_parameters=GEMMA3_ROPE),
        True,
    ),
    "gemma3-1kv-cap": (
        "Gemma3TextConfig",
        dict(num_key_value_heads=1, sliding_window=12, final_logit_softcapping=3.0),
        False,
    ),
    # 5 layers: the last two attend to layer 2's (sliding) and layer 1's (full) keys and values;
    # full layers: head 32, one kv head (replicated under TP), values = keys, proportional rope
    "gemma4": (
        "Gemma4TextConfig",
        dict(num_hidden_layers=5, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
             attention_k_eq_v=True, sliding_window=8, num_kv_shared_layers=2,
             layer_types=["sliding_attention", "full_attention", "sliding_attention",
                          "sliding_attention", "full_attention"],
             hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
             use_double_wide_mlp=True, final_logit_softcapping=5.0),
        True,
    ),
    "granite": (
        "GraniteConfig",
        dict(embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.3,
             logits_scaling=2.5, attention_bias=True, tie_word_embeddings=False),
        True,
    ),
    "olmo2": ("Olmo2Config", dict(tie_word_embeddings=False), True),
    "olmo2-1kv-bias": ("Olmo2Config", dict(num_key_value_heads=1, attention_bias=True), False),
    "olmo3": (
        "Olmo3Config",
        dict(sliding_window=8, layer_types=["sliding_attention", "sliding_attention",
                                            "full_attention"]),
        True,
    ),
    "stablelm": (
        "StableLmConfig",
        dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                              "partial_rotary_factor": 0.25}, use_qkv_bias=True,
             tie_word_embeddings=False),
        True,
    ),
    "stablelm-parallel-qknorm": (
        "StableLmConfig",
        dict(use_parallel_residual=True, qk_layernorm=True, num_key_value_heads=1),
        False,
    ),
    "starcoder2": ("Starcoder2Config", dict(sliding_window=8, hidden_act="gelu_pytorch_tanh"),
                   True),
    "starcoder2-nobias": ("Starcoder2Config", dict(use_bias=False, head_dim=32), False),
    "glm4": ("Glm4Config", dict(head_dim=32, tie_word_embeddings=False), True),
    "glm4-1kv-nobias": ("Glm4Config", dict(num_key_value_heads=1, attention_bias=False,
                                           head_dim=16), False),
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=4, tie_word_embeddings=True), True),
    "smollm3-window": (
        "SmolLM3Config",
        dict(num_hidden_layers=4, no_rope_layers=[1, 0, 1, 0], use_sliding_window=True,
             sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2),
        False,
    ),
    "cohere": ("CohereConfig", dict(logit_scale=0.5, tie_word_embeddings=False), True),
    "cohere-qknorm-bias": (
        "CohereConfig",
        dict(use_qk_norm=True, attention_bias=True, num_key_value_heads=1),
        False,
    ),
    "cohere2": ("Cohere2Config", dict(sliding_window=8, sliding_window_pattern=2), True),
    "exaone4": ("Exaone4Config", dict(sliding_window=8, sliding_window_pattern=2,
                                      num_hidden_layers=4), True),
    "exaone4-global": ("Exaone4Config", dict(sliding_window=None, head_dim=32,
                                             layer_types=["full_attention"] * 3,
                                             tie_word_embeddings=False), False),
    "ministral3": (  # yarn, and a query scale that changes every 16 positions
        "Ministral3Config",
        dict(head_dim=32, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 16, "max_position_embeddings": 512,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
            "llama_4_scaling_beta": 0.5}),
        True,
    ),
    "ministral3-window": (
        "Ministral3Config",
        dict(sliding_window=8, num_key_value_heads=1, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
            "original_max_position_embeddings": 64, "beta_fast": 16.0, "beta_slow": 2.0,
            "llama_4_scaling_beta": 0.1}),
        False,
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    config_class, overrides, greedy = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return path, make_tiny_model(path, config_class, **overrides), greedy


def test_paged_logits_match_transformers(case):
    path, hf, _ = case
    check_paged_logits(hf, make_runner(path))


def test_greedy_tokens_equal_hf_generate(case):
    path, hf, greedy = case
    if not greedy:
        pytest.skip("greedy decoding is checked on one variant per family")
    check_greedy(hf, path)


@pytest.mark.parametrize("name, fused", [("qwen2", True), ("mistral-no-window", True),
                                         ("mistral-window", False), ("qwen3-head-dim", False),
                                         ("gemma", False)])  # fmt: skip
def test_fused_cpu_decode_takes_the_layers_it_can_express(tmp_path, name, fused):
    """Plain pre-norm RMSNorm / gated-SiLU / full-rope layers hand their weights to the fused C
    decode, which then runs the decode steps where the kernel takes them (Qwen 2: qkv bias, head
    size 16) and matches transformers; windows, q/k norms and Gemma's norms run the layers."""
    from paphos.kernels.cpu import decoder_layer

    config_class, overrides, _ = CASES[name]
    hf = make_tiny_model(tmp_path, config_class, **overrides)
    runner = make_runner(tmp_path)
    model = runner.model.model
    weights = [layer.fused_weights() for layer in model.layers]
    assert all((w is not None) == fused for w in weights)
    # the log line that says the fused path is off names the layer's feature in words
    reason = model.layers[0].fused_unfit_reason()
    words = {"mistral-window": "a sliding window", "qwen3-head-dim": "q/k norms", "gemma": "norms"}
    assert (reason is None) == fused and (fused or words[name] in reason), reason
    if name != "qwen2" or decoder_layer.load_library() is None:
        return
    assert decoder_layer.unsupported_reason(weights[0]) is None
    check_paged_logits(hf, runner)
    ran = model.fused.get(lambda: weights, model.layers[0].self_attn.qkv_proj.weight)
    assert ran is not None and ran.num_steps > 0
