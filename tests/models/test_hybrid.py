"""Hybrid models (recurrent-state layers beside attention) against transformers on tiny random
checkpoints: paged logits across a chunk boundary inside a prompt, a batch mixing prefill chunks
and decodes, then decodes through the state slots; greedy `LLM.generate` against HF `generate`;
preemption (recompute), few state slots and aborts leaving the state pool whole; TP=2 == TP=1.
Each case: (transformers config class, overrides of zoo_harness.TINY)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from paphos import LLM, SamplingParams
from paphos.runner.model_runner import ModelRunner
from tests.engine.test_tensor_parallel import (
    _run_two_ranks,
    _runner_config,
    no_process_left_behind,  # noqa: F401 - autouse: no rank process survives a test
    prefill_then_decode_logits,
)
from tests.models.zoo_harness import (
    TINY,
    VOCAB,
    check_greedy,
    check_paged_logits,
    hf_greedy,
    make_runner,
    make_tiny_model,
)

MAMBA2 = dict(
    num_heads=8, head_dim=16, expand=2, n_groups=2, state_size=16, conv_kernel=4, chunk_size=8,
    num_hidden_layers=2,
)  # fmt: skip

QWEN3_5 = dict(
    head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=8, linear_conv_kernel_dim=4, num_hidden_layers=4,
    layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
)  # fmt: skip

NEMOTRON_H = dict(
    mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16, conv_kernel=4,
    chunk_size=8, head_dim=16, mlp_hidden_act="relu2", use_conv_bias=True,
    layers_block_type=["linear_attention", "mlp", "full_attention", "linear_attention", "mlp"],
)  # fmt: skip

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
           shared_expert_intermediate_size=40)  # fmt: skip

GRANITE = dict(
    layer_types=["mamba", "attention", "mamba"], num_hidden_layers=3, mamba_n_heads=8,
    mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=8,
    position_embedding_type="rope", num_local_experts=4, num_experts_per_tok=2,
    shared_intermediate_size=40, intermediate_size=24, embedding_multiplier=1.5,
    residual_multiplier=0.7, attention_multiplier=0.2, logits_scaling=2.0,
)  # fmt: skip

CASES: dict[str, tuple[str, dict]] = {
    "granite_moe_hybrid": ("GraniteMoeHybridConfig", GRANITE),
    "qwen3_next": (
        "Qwen3NextConfig",
        {**QWEN3_5, **MOE, "decoder_sparse_step": 1, "mlp_only_layers": [2]},
    ),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", {**QWEN3_5, **MOE}),
    "nemotron_h": ("NemotronHConfig", NEMOTRON_H),
    "mamba2": ("Mamba2Config", MAMBA2),
    "qwen3_5": ("Qwen3_5TextConfig", QWEN3_5),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory) -> tuple[str, Path, torch.nn.Module]:
    config_class, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, make_tiny_model(path, config_class, **overrides)


def test_paged_logits_equal_transformers(tiny) -> None:
    _, path, hf = tiny
    check_paged_logits(hf, make_runner(path))


def test_greedy_equals_transformers_generate(tiny) -> None:
    _, path, hf = tiny
    check_greedy(hf, path)


def _assert_pool_whole(llm: LLM) -> None:
    scheduler = llm.engine.scheduler
    scheduler.check_invariants()
    pool = scheduler.state_pool
    assert pool is not None and pool.num_free_slots == pool.num_slots
    stats = llm.engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks


def test_preemption_chunks_and_few_slots_keep_greedy_tokens(tiny) -> None:
    """5 blocks of 16 for prompts of up to 40 tokens (preemption), a 16-token budget (chunk
    boundaries inside prompts, prefill chunks beside decodes), 2 state slots for 4 requests."""
    _, path, hf = tiny
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (40, 7, 23, 30)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(
        model=str(path), dtype="float32", skip_tokenizer_init=True, device="cpu",
        num_blocks_override=5, max_num_batched_tokens=16, num_state_slots=2,
    ) as llm:  # fmt: skip
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert llm.engine.scheduler.get_stats().num_preemptions > 0
        _assert_pool_whole(llm)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)


def test_aborts_return_every_state_slot(tiny) -> None:
    _, path, _ = tiny
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with LLM(
        model=str(path), dtype="float32", skip_tokenizer_init=True, device="cpu",
        kv_cache_space=0.01, num_state_slots=3, max_num_batched_tokens=16,
    ) as llm:  # fmt: skip
        engine = llm.engine
        for i in range(5):
            engine.add_request(f"r{i}", {"prompt_token_ids": list(range(3, 13 + i))}, params)
        for _ in range(3):
            engine.step()
        assert engine.scheduler.state_pool.num_free_slots == 0  # 3 running, 2 waiting
        engine.abort_request(["r0", "r3"])
        engine.step()
        engine.abort_request([f"r{i}" for i in range(5)])
        engine.step()
        assert not engine.has_unfinished_requests()
        _assert_pool_whole(llm)


def test_two_ranks_give_the_logits_of_one_rank(tiny) -> None:
    _, path, _ = tiny
    expected = prefill_then_decode_logits(ModelRunner(_runner_config(path)))
    by_rank = _run_two_ranks(path)
    for rank in (0, 1):
        for got, want in zip(by_rank[rank], expected, strict=True):
            assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_qwen3_5_conditional_generation_checkpoint_serves_its_language_model(tmp_path) -> None:
    """A Qwen3.5 ...ForConditionalGeneration checkpoint (vision tower and all): the language
    model loads from model.language_model.*, the tower is skipped, logits equal HF's on text."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64,
                  patch_size=4, temporal_patch_size=1, spatial_merge_size=1)  # fmt: skip
    config = Qwen3_5Config(text_config={**TINY, **QWEN3_5}, vision_config=vision)
    torch.manual_seed(0)
    hf = Qwen3_5ForConditionalGeneration(config).float().eval()
    with torch.no_grad():  # zero-initialised norms would hide a missing load or +1
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    hf.save_pretrained(tmp_path)
    runner = make_runner(tmp_path)
    assert type(runner.model).__name__ == "Qwen3_5ForCausalLM"
    check_paged_logits(hf, runner)
