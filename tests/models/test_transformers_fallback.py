"""The transformers fallback (`model_impl="transformers"`) equals transformers on architectures
paphos has no class for, and on Llama beside the native class; architectures it cannot run
exactly are refused at build time with the reason."""

from __future__ import annotations

import inspect
import logging

import pytest
import transformers

from paphos.attention import Attention
from paphos.models.registry import ModelRegistry
from paphos.models.transformers_impl import TransformersForCausalLM
from tests.models.hf_compare import build_runner, check_greedy, check_mixed_batch, save_tiny

IDS = dict(vocab_size=101, bos_token_id=1, eos_token_id=2, pad_token_id=0)
DECODER = dict(
    IDS,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    head_dim=8,
    max_position_embeddings=128,
)
# architecture -> config kwargs: each one has something the others do not
ARCHITECTURES = {
    "Helium": dict(DECODER, num_key_value_heads=2),  # GQA
    "BioGpt": dict(DECODER),  # learned positions (offset 2), scaled embeddings, LayerNorm
    "CodeGen": dict(
        IDS, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128
    ),  # gptj rope
    "Olmo": dict(DECODER, clip_qkv=0.5),  # non-parametric LayerNorm, qkv clipping
    "SeedOss": dict(DECODER, num_key_value_heads=1, head_dim=16),  # MQA, head_dim != hidden/heads
    "Ernie4_5": dict(DECODER, num_key_value_heads=2, use_bias=True),  # biases, interleaved rope
    "Llama": dict(DECODER, num_key_value_heads=2, tie_word_embeddings=True),  # against native too
    # MoE: per-expert checkpoint tensors, stacked by transformers' conversion when loading
    "Mixtral": dict(DECODER, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "Qwen2Moe": dict(
        DECODER,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    ),
}


def _make(arch: str, path):
    config = getattr(transformers, f"{arch}Config")(**ARCHITECTURES[arch])
    return save_tiny(getattr(transformers, f"{arch}ForCausalLM"), config, path)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, _make(request.param, path)


def test_mixed_batch_logprobs_equal_transformers(tiny):
    arch, path, hf = tiny
    runner = build_runner(path, model_impl="transformers")
    assert isinstance(runner.model, TransformersForCausalLM)
    check_mixed_batch(hf, runner)


def test_greedy_tokens_equal_hf_generate(tiny):
    _, path, hf = tiny
    check_greedy(path, hf, model_impl="transformers")


def test_native_llama_passes_the_same_checks(tmp_path):
    """The bar the fallback meets above is the native class's."""
    hf = _make("Llama", tmp_path)
    native = build_runner(tmp_path, model_impl="paphos")
    assert type(native.model).__name__ == "LlamaForCausalLM"
    check_mixed_batch(hf, native)


def test_auto_picks_the_fallback_only_without_a_native_class(tmp_path, caplog):
    _make("Helium", tmp_path)
    with caplog.at_level(logging.INFO, logger="paphos.models.registry"):
        runner = build_runner(tmp_path)  # model_impl="auto"
    assert isinstance(runner.model, TransformersForCausalLM)
    assert "HeliumForCausalLM has no paphos implementation" in caplog.text
    with pytest.raises(ValueError, match="--model-impl transformers"):
        build_runner(tmp_path, model_impl="paphos")


UNSUPPORTED = {
    "Bloom": (dict(IDS, hidden_size=32, n_layer=2, n_head=4), "never called transformers'"),
    "Mpt": (dict(IDS, d_model=32, n_heads=4, n_layers=2), "did not run with paphos's attention"),
    "Nemotron": (dict(DECODER, num_key_value_heads=2), "do not pass their keyword arguments"),
    "GPTNeo": (
        dict(IDS, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global"], 2]]),
        "cannot build",
    ),
    "Lfm2": (  # a hybrid: its convolution layers keep state the fallback has no cache for
        dict(DECODER, num_key_value_heads=2, layer_types=["conv", "full_attention"]),
        "1 of its 2 layers attend",
    ),
}


@pytest.mark.parametrize("arch", list(UNSUPPORTED))
def test_architectures_it_cannot_run_exactly_are_refused_with_the_reason(arch, tmp_path):
    kwargs, reason = UNSUPPORTED[arch]
    config = getattr(transformers, f"{arch}Config")(**kwargs)
    save_tiny(getattr(transformers, f"{arch}ForCausalLM"), config, tmp_path)
    with pytest.raises(ValueError, match=reason):
        build_runner(tmp_path, model_impl="transformers")


def test_unknown_architecture_names_the_closest_and_the_fallback():
    error = ModelRegistry.unsupported_error("LlamaForCausalLMX")
    assert "closest supported: LlamaForCausalLM" in str(error)
    assert "--model-impl transformers" in str(error)


WINDOWED = {  # windows shorter than the test's prompts; Gemma 2 also soft-caps
    "Mistral": dict(DECODER, num_key_value_heads=2, sliding_window=8),
    "Gemma2": dict(
        DECODER,
        num_key_value_heads=2,
        sliding_window=8,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
        query_pre_attn_scalar=8,
    ),
}


@pytest.mark.parametrize("arch", list(WINDOWED))
def test_sliding_window_and_soft_cap_run_where_paged_attention_applies_them(arch, tmp_path):
    """With an Attention that takes sliding_window / logits_soft_cap, the fallback passes HF's
    per-layer values on and equals transformers; without, it refuses naming them."""
    config = getattr(transformers, f"{arch}Config")(**WINDOWED[arch])
    hf = save_tiny(getattr(transformers, f"{arch}ForCausalLM"), config, tmp_path)
    if "sliding_window" not in inspect.signature(Attention.__init__).parameters:
        with pytest.raises(ValueError, match="needs sliding_window"):
            build_runner(tmp_path, model_impl="transformers")
        return
    runner = build_runner(tmp_path, model_impl="transformers")
    assert {layer.sliding_window for layer in runner.model.attn_layers} >= {8}
    check_mixed_batch(hf, runner)
