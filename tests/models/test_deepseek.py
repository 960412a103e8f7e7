"""DeepSeek V2 / V3 (multi-head latent attention) against transformers on tiny random checkpoints:
every token's logprobs in mixed batches (prefill chunks with cached context beside decodes, the
decodes in MLA's absorbed form, the chunks expanded), greedy tokens against HF `generate` (also
with a shared prompt prefix served from the prefix cache), TP=2 against TP=1 over gloo, and 2-rank
tensor and expert parallel `LLM`s against `generate`.
Variants: q_lora_rank set and None, biases, yarn with mscale_all_dim, V3's neox-style rope; all
dense, or a dense first layer then experts (V3's sigmoid grouped routing, V2's softmax greedy and
group-limited), with shared experts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import transformers
from torch.testing import assert_close

from paphos import LLM, SamplingParams
from paphos.runner.model_runner import ModelRunner
from tests.engine.test_tensor_parallel import (
    _run_two_ranks,
    _runner_config,
    no_process_left_behind,  # noqa: F401 - autouse: no rank process survives a test
    prefill_then_decode_logits,
)
from tests.models.hf_compare import build_runner, check_greedy, check_mixed_batch
from tests.models.test_zoo_moe import make_tiny_moe

MLA = dict(
    num_key_value_heads=4,  # V3 defaults to 128: HF's eager attention would repeat kv 0 times
    kv_lora_rank=32,
    q_lora_rank=24,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    first_k_dense_replace=3,  # all dense (zoo_harness's TINY has 3 layers)
)
MOE = dict(
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
    n_shared_experts=1,
)  # fmt: skip
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 128,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,  # softmax scaled by mscale^2 (and cos/sin by mscale / mscale_all_dim)
    "beta_fast": 32,
    "beta_slow": 1,
}
# case -> (transformers family, config overrides)
CASES = {
    "v3-q-lora": ("DeepseekV3", {}),
    "v3-no-q-lora-bias": ("DeepseekV3", dict(q_lora_rank=None, attention_bias=True)),
    "v3-yarn-neox-rope": ("DeepseekV3", dict(rope_parameters=YARN, rope_interleave=False)),
    "v2-q-lora": ("DeepseekV2", {}),
    "v2-no-q-lora-yarn": ("DeepseekV2", dict(q_lora_rank=None, rope_parameters=YARN)),
    # dense first layer, then experts (sigmoid + correction bias, grouped top-k, renormalised)
    "v3-moe": (
        "DeepseekV3",
        dict(n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, **MOE),
    ),
    "v2-moe-group-limited": (
        "DeepseekV2",
        dict(
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            **{**MOE, "n_shared_experts": 2},
        ),
    ),
    "v2-moe-greedy-no-q-lora": ("DeepseekV2", dict(q_lora_rank=None, topk_method="greedy", **MOE)),
}


def make_deepseek(path: Path, name: str) -> transformers.PreTrainedModel:
    family, overrides = CASES[name]
    return make_tiny_moe(path, f"{family}Config", **{**MLA, **overrides})


@pytest.mark.parametrize("name", list(CASES))
def test_logprobs_in_mixed_batches_equal_transformers(tmp_path, name):
    hf = make_deepseek(tmp_path, name)
    runner = build_runner(tmp_path)
    spec = runner.kv_cache_spec()
    assert [layer.layout for layer in spec.layers] == ["latent"] * 3
    assert spec.bytes_per_token == 3 * (32 + 8) * 4  # layers x (kv_lora_rank + rope) x fp32
    check_mixed_batch(hf, runner)


@pytest.mark.parametrize(
    "name", ["v3-q-lora", "v2-no-q-lora-yarn", "v3-moe", "v2-moe-group-limited"]
)
def test_greedy_equals_transformers_generate(tmp_path, name):
    hf = make_deepseek(tmp_path, name)
    check_greedy(tmp_path, hf, max_tokens=12)


def test_greedy_from_the_prefix_cache_equals_transformers(tmp_path, caplog):
    """Two requests sharing a 40-token prefix, the second after the first finished: it reads two
    cached blocks (of 16) of latents, its last chunk and decodes attend to them. Start-up logs
    the latent cache's bytes per token."""
    hf = make_deepseek(tmp_path, "v3-moe")
    gen = torch.Generator().manual_seed(5)
    prefix = torch.randint(3, 211, (40,), generator=gen).tolist()
    prompts = [prefix + [7, 8, 9], prefix + [11, 12, 13, 14, 15]]
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=8)
    kwargs = dict(dtype="float32", skip_tokenizer_init=True, kv_cache_space=0.01, device="cpu")
    outs = []
    caplog.set_level(logging.INFO, logger="paphos.runner.model_runner")
    with LLM(model=str(tmp_path), max_num_batched_tokens=24, **kwargs) as llm:
        for prompt in prompts:
            outs += llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    assert outs[1].num_cached_tokens == 32
    layout = "KV cache layout: 480 bytes per token (float32; 3 latent layers x 40 values"
    assert layout in caplog.text
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()  # fmt: skip
        assert out.outputs[0].token_ids == ref


@pytest.mark.parametrize("name", ["v2-no-q-lora-yarn", "v3-moe", "v2-moe-greedy-no-q-lora"])
def test_two_ranks_give_the_logits_of_one_rank(tmp_path, name):
    make_deepseek(tmp_path, name)
    expected = prefill_then_decode_logits(ModelRunner(_runner_config(tmp_path)))
    by_rank = _run_two_ranks(tmp_path)
    for rank in (0, 1):
        for got, want in zip(by_rank[rank], expected, strict=True):
            assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_tensor_parallel_greedy_in_mixed_batches_equals_transformers(tmp_path):
    """LLM at TP=2 (the multiprocess executor) with a 16-token budget: prompts are prefilled in
    chunks beside other requests' decodes."""
    hf = make_deepseek(tmp_path, "v3-moe")
    check_greedy(tmp_path, hf, max_tokens=8, tensor_parallel_size=2, max_num_batched_tokens=16)


def test_expert_parallel_greedy_equals_transformers(tmp_path):
    """LLM at 2 ranks with --enable-expert-parallel: each rank holds 4 whole experts of 8 (and
    half the attention heads)."""
    hf = make_deepseek(tmp_path, "v2-moe-group-limited")
    check_greedy(tmp_path, hf, max_tokens=8, tensor_parallel_size=2, enable_expert_parallel=True)
