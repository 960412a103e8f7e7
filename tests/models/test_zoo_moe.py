"""The mixture-of-experts families against transformers (tests/models/zoo_harness.py), one tiny
random checkpoint per family (few experts, top-k 2, float32): paged logits in mixed batches and
greedy tokens; then TP=2 and expert parallel at 2 ranks against TP=1, every family in one
spawned process group. Correction biases (buffers transformers leaves at zero) and attention
sinks are drawn at the scale of real ones."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from paphos.layers.moe import FusedMoE
from paphos.runner.model_runner import ModelRunner
from tests.engine.test_tensor_parallel import (
    TIMEOUT_S,
    _runner_config,
    no_process_left_behind,  # noqa: F401 - autouse: no rank process survives a test
    prefill_then_decode_logits,
    run_on_two_ranks,
)
from tests.models.zoo_harness import check_greedy, check_paged_logits, make_runner, make_tiny_model

MOE = dict(num_experts_per_tok=2)
# case id -> (transformers config class, config overrides)
CASES = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, **MOE)),
    "qwen2-moe": (
        "Qwen2MoeConfig",
        dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48,
             mlp_only_layers=[1], norm_topk_prob=False, **MOE),
    ),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        dict(num_experts=4, moe_intermediate_size=32, norm_topk_prob=True, head_dim=32, **MOE),
    ),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, clip_qkv=1.5, **MOE)),
    "granitemoe": (
        "GraniteMoeConfig",
        dict(num_local_experts=4, embedding_multiplier=3.0, residual_multiplier=0.4,
             attention_multiplier=0.3, logits_scaling=2.5, **MOE),
    ),
    "glm4-moe": (
        "Glm4MoeConfig",
        dict(n_routed_experts=8, n_group=2, topk_group=1, moe_intermediate_size=32,
             first_k_dense_replace=1, n_shared_experts=1, use_qk_norm=True, attention_bias=True,
             routed_scaling_factor=2.0, norm_topk_prob=True, **MOE),
    ),
    "minimax-m2": ("MiniMaxM2Config", dict(num_local_experts=4, head_dim=16, rotary_dim=8, **MOE)),
    "llama4": (  # chunks of 8, every 4th layer NoPE with temperature tuning, MoE every 2nd
        "Llama4TextConfig",
        dict(num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=1,
             intermediate_size_mlp=80, interleave_moe_layer_step=2, attention_chunk_size=8,
             head_dim=16, floor_scale=4, attn_scale=0.5),
    ),
    "gpt-oss": (
        "GptOssConfig",
        dict(num_local_experts=4, head_dim=16, sliding_window=8, swiglu_limit=1.0,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"], **MOE),
    ),
}  # fmt: skip


def make_tiny_moe(path: Path, config_class: str, **overrides) -> torch.nn.Module:
    """make_tiny_model, with the expert-score correction biases (buffers transformers leaves at
    zero) and attention sinks drawn at the scale of real ones, then saved again."""
    model = make_tiny_model(path, config_class, **overrides)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    drawn = [t for n, t in tensors if n.endswith(("e_score_correction_bias", ".sinks"))]
    if drawn:
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for tensor in drawn:
                tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.5)
        model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    config_class, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, make_tiny_moe(path, config_class, **overrides)


def test_paged_logits_match_transformers(case):
    name, path, hf = case
    runner = make_runner(path)
    assert type(runner.model).__name__ == type(hf).__name__  # the native class, not the fallback
    check_paged_logits(hf, runner)


def test_start_up_logs_parameter_and_active_bytes(tmp_path, caplog):
    config_class, overrides = CASES["mixtral"]  # 4 experts, top-2: a token reads half of them
    make_tiny_moe(tmp_path, config_class, **overrides)
    with caplog.at_level(logging.INFO, logger="paphos.runner.model_runner"):
        runner = make_runner(tmp_path)
    sizes = {n: p.numel() * 4 for n, p in runner.model.named_parameters()}
    experts = sum(size for n, size in sizes.items() if ".w13_" in n or ".w2_" in n)
    total, active = sum(sizes.values()), sum(sizes.values()) - experts / 2
    logged = f"{total / 2**20:.1f} MiB of parameters on rank 0, {active / 2**20:.1f} MiB"
    assert logged in caplog.text


def test_greedy_tokens_equal_hf_generate(case):
    _, path, hf = case
    check_greedy(hf, path)


# ---- tensor and expert parallelism -------------------------------------------------------------

MODES = {"tp": False, "ep": True}  # mode -> enable_expert_parallel


def _config(model_dir: str, expert_parallel: bool):
    config = _runner_config(Path(model_dir))
    parallel = dataclasses.replace(config.parallel, enable_expert_parallel=expert_parallel)
    return dataclasses.replace(config, parallel=parallel)


def _rank_logits(parallel, model_dirs: dict) -> dict:
    """One rank: every case's logits in both modes."""
    out = {}
    for name, model_dir in model_dirs.items():
        for mode, expert_parallel in MODES.items():
            runner = ModelRunner(_config(model_dir, expert_parallel), parallel)
            moe = next(m for m in runner.model.modules() if isinstance(m, FusedMoE))
            held = (moe.num_local_experts, moe.num_experts, moe.w2_weight.shape[-1])
            out[name, mode] = held, [t.numpy() for t in prefill_then_decode_logits(runner)]
    return out


@pytest.fixture(scope="module")
def two_rank_logits(tmp_path_factory):
    """(expected logits of one rank per case, {rank: {(case, mode): logits}})."""
    dirs, expected = {}, {}
    for name, (config_class, overrides) in CASES.items():
        path = tmp_path_factory.mktemp(f"tp-{name}")
        make_tiny_moe(path, config_class, **overrides)
        dirs[name] = str(path)
        expected[name] = prefill_then_decode_logits(ModelRunner(_runner_config(path)))
    by_rank = run_on_two_ranks(_rank_logits, dirs, timeout_s=TIMEOUT_S * 3)
    return expected, by_rank


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_give_the_logits_of_one_rank(two_rank_logits, name, mode):
    expected, by_rank = two_rank_logits
    for rank in (0, 1):
        (local, num_experts, inter), logits = by_rank[rank][name, mode]
        other_inter = by_rank[rank][name, "ep" if mode == "tp" else "tp"][0][2]
        if mode == "ep":  # half the experts, whole
            assert (local, inter) == (num_experts // 2, 2 * other_inter)
        else:  # every expert, half its features
            assert (local, 2 * inter) == (num_experts, other_inter)
        for got, want in zip(logits, expected[name], strict=True):
            assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)
