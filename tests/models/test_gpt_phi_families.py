"""Native GPT-style and Phi families equal transformers: every token's logprobs in a batch that
mixes prefill chunks, a chunk with cached context and decodes (each variant), and greedy tokens
against HF `generate` (the first variant of each architecture)."""

from __future__ import annotations

import inspect

import pytest
import transformers

from paphos.attention import Attention
from paphos.models.registry import ModelRegistry
from tests.models.hf_compare import build_runner, check_greedy, check_mixed_batch, save_tiny

IDS = dict(vocab_size=101, bos_token_id=1, eos_token_id=2, pad_token_id=0)
GPT = dict(IDS, n_embd=32, n_layer=2, n_head=4, n_positions=128)
DEC = dict(
    IDS,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=128,
)
LONGROPE = dict(  # for head_dim 16: the fused CPU decode kernel runs those layers
    rope_type="longrope",
    rope_theta=1e4,
    short_factor=[1.0, 1.1, 1.2, 1.4, 1.6, 2.0, 2.5, 3.0],
    long_factor=[2.0, 3, 4, 5, 6, 7, 8, 9],
)

# case -> (HF architecture, config kwargs); the first case of an architecture also runs greedy
CASES = {
    "gpt2": ("GPT2LMHeadModel", dict(GPT)),
    "gpt2_untied_relu_layer_scaled": (
        "GPT2LMHeadModel",
        dict(
            GPT,
            tie_word_embeddings=False,
            activation_function="relu",
            scale_attn_by_inverse_layer_idx=True,
        ),
    ),
    "bigcode_mqa": ("GPTBigCodeForCausalLM", dict(GPT, multi_query=True)),
    "bigcode_mha": ("GPTBigCodeForCausalLM", dict(GPT, multi_query=False)),
    "neox": ("GPTNeoXForCausalLM", dict(DEC, rotary_pct=0.5)),
    "neox_sequential_nobias_tied": (
        "GPTNeoXForCausalLM",
        dict(DEC, use_parallel_residual=False, attention_bias=False, tie_word_embeddings=True),
    ),
    "gptj": ("GPTJForCausalLM", dict(GPT, rotary_dim=4)),
    "gptj_full_rotary_tied": (
        "GPTJForCausalLM",
        dict(GPT, rotary_dim=8, tie_word_embeddings=True),
    ),
    "opt": ("OPTForCausalLM", dict(DEC, ffn_dim=48, word_embed_proj_dim=32)),
    "opt_350m_layout": (
        "OPTForCausalLM",  # post-LN, projections around a narrower embedding, no biases, untied
        dict(
            DEC,
            ffn_dim=48,
            word_embed_proj_dim=16,
            do_layer_norm_before=False,
            enable_bias=False,
            tie_word_embeddings=False,
        ),
    ),
    "falcon_7b": ("FalconForCausalLM", dict(DEC, multi_query=True, parallel_attn=True)),
    "falcon_sequential_bias_untied": (
        "FalconForCausalLM",
        dict(DEC, multi_query=False, parallel_attn=False, bias=True, tie_word_embeddings=False),
    ),
    "falcon_40b": ("FalconForCausalLM", dict(DEC, new_decoder_architecture=True, num_kv_heads=2)),
    "falcon_new_one_norm": (
        "FalconForCausalLM",
        dict(DEC, new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
    ),
    "phi": ("PhiForCausalLM", dict(DEC, partial_rotary_factor=0.5)),
    "phi_qk_layernorm_gqa_tied": (
        "PhiForCausalLM",
        dict(
            DEC,
            partial_rotary_factor=0.5,
            qk_layernorm=True,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    "phi3_longrope": (
        "Phi3ForCausalLM",
        dict(
            DEC,
            hidden_size=64,
            num_key_value_heads=2,
            original_max_position_embeddings=64,
            rope_parameters=LONGROPE,
        ),
    ),
    "phi3_plain": ("Phi3ForCausalLM", dict(DEC, num_key_value_heads=2)),
    "phi4_partial_longrope_mqa_tied": (
        "Phi3ForCausalLM",
        dict(
            DEC,
            num_key_value_heads=1,
            partial_rotary_factor=0.5,
            original_max_position_embeddings=64,
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="longrope", rope_theta=1e4, short_factor=[1.0, 1.5], long_factor=[3, 5]
            ),
        ),
    ),
}
GREEDY = {arch: case for case, (arch, _) in reversed(CASES.items())}  # first case per arch


def _config(arch: str, kwargs: dict):
    family = arch.removesuffix("LMHeadModel").removesuffix("ForCausalLM")
    return getattr(transformers, f"{family}Config")(**kwargs)


@pytest.fixture(scope="module", params=list(CASES))
def tiny(request, tmp_path_factory):
    arch, kwargs = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny(getattr(transformers, arch), _config(arch, kwargs), path)
    return request.param, arch, path, hf


def test_mixed_batch_logprobs_equal_transformers(tiny):
    _, arch, path, hf = tiny
    runner = build_runner(path, model_impl="paphos")
    assert type(runner.model).__name__ == arch
    check_mixed_batch(hf, runner)


@pytest.mark.parametrize("arch", list(GREEDY))
def test_greedy_tokens_equal_hf_generate(arch, tmp_path):
    _, kwargs = CASES[GREEDY[arch]]
    hf = save_tiny(getattr(transformers, arch), _config(arch, kwargs), tmp_path)
    check_greedy(tmp_path, hf, model_impl="paphos")


def test_phi3_decodes_through_the_fused_cpu_kernel_with_its_longrope_table(tmp_path):
    arch, kwargs = CASES["phi3_longrope"]
    hf = save_tiny(getattr(transformers, arch), _config(arch, kwargs), tmp_path)
    runner = build_runner(tmp_path)
    check_mixed_batch(hf, runner)
    if runner.model.model._fused_decode is None:
        pytest.skip("the fused CPU decode kernel did not build here")


def test_every_family_here_is_registered():
    assert {arch for arch, _ in CASES.values()} <= set(ModelRegistry.supported_architectures())


def test_falcon_with_alibi_is_refused(tmp_path):
    save_tiny(transformers.FalconForCausalLM, _config("FalconForCausalLM", dict(DEC, alibi=True)),
              tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="alibi=True is not supported"):
        build_runner(tmp_path)


def test_phi3_sliding_window_shorter_than_the_prompts(tmp_path):
    if "sliding_window" not in inspect.signature(Attention.__init__).parameters:
        pytest.skip("paphos's Attention has no sliding window here (Phi-3 warns and ignores it)")
    arch, kwargs = CASES["phi3_plain"]
    config = _config(arch, dict(kwargs, sliding_window=8))
    hf = save_tiny(getattr(transformers, arch), config, tmp_path)
    runner = build_runner(tmp_path)
    assert runner.model.model.layers[0].self_attn.attn.sliding_window == 8
    check_mixed_batch(hf, runner)
