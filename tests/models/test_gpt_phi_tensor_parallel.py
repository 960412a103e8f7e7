"""TP=2 over gloo equals TP=1 for the GPT-style and Phi families and for the transformers
fallback (sharded by the HF model's `base_model_tp_plan`): every model runs in one pair of rank
processes (one spawn for all), prefill then decode, logits compared on both ranks. A fallback
model without a tp plan, or with one kv head, is refused at TP=2 with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from torch.testing import assert_close

from paphos.runner.model_runner import ModelRunner
from tests.engine.test_tensor_parallel import (
    TIMEOUT_S,
    _runner_config,
    prefill_then_decode_logits,
    run_on_two_ranks,
)
from tests.models.hf_compare import save_tiny
from tests.models.test_gpt_phi_families import CASES, _config

# one case per family: kv heads < 2 replicate (BigCode MQA, Falcon-7B, Phi-4 MQA)
NATIVE = [
    "gpt2",
    "bigcode_mqa",
    "neox",
    "gptj",
    "opt_350m_layout",
    "falcon_7b",
    "falcon_40b",
    "phi_qk_layernorm_gqa_tied",
    "phi4_partial_longrope_mqa_tied",
]
FALLBACK = {  # no native class: the transformers fallback, sharded by its tp plan
    "HeliumForCausalLM": dict(
        vocab_size=101,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        head_dim=8,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
}


def _rank_logits(parallel, model_dirs: list[str]) -> dict[str, object]:
    out = {}
    for model_dir in model_dirs:
        try:
            runner = ModelRunner(_runner_config(Path(model_dir)), parallel)
            out[model_dir] = [t.numpy() for t in prefill_then_decode_logits(runner)]
        except ValueError as e:  # a refusal is a result too
            out[model_dir] = str(e)
    return out


def _run_two_ranks(model_dirs: list[Path]) -> dict[int, dict[str, object]]:
    dirs = [str(d) for d in model_dirs]
    return run_on_two_ranks(_rank_logits, dirs, timeout_s=TIMEOUT_S * 2)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for case in NATIVE:
        arch, kwargs = CASES[case]
        dirs[case] = tmp_path_factory.mktemp(case)
        save_tiny(getattr(transformers, arch), _config(arch, kwargs), dirs[case])
    for arch, kwargs in FALLBACK.items():
        dirs[arch] = tmp_path_factory.mktemp(arch)
        save_tiny(getattr(transformers, arch), _config(arch, kwargs), dirs[arch])
    no_plan = transformers.BioGptConfig(**{**FALLBACK["HeliumForCausalLM"], "head_dim": None})
    dirs["no_tp_plan"] = tmp_path_factory.mktemp("biogpt")
    save_tiny(transformers.BioGptForCausalLM, no_plan, dirs["no_tp_plan"])
    one_kv_head = transformers.HeliumConfig(
        **{**FALLBACK["HeliumForCausalLM"], "num_key_value_heads": 1}
    )
    dirs["one_kv_head"] = tmp_path_factory.mktemp("helium_mqa")
    save_tiny(transformers.HeliumForCausalLM, one_kv_head, dirs["one_kv_head"])
    return dirs


@pytest.fixture(scope="module")
def tp2(model_dirs):
    by_rank = _run_two_ranks(list(model_dirs.values()))
    return {name: [by_rank[r][str(d)] for r in (0, 1)] for name, d in model_dirs.items()}


@pytest.mark.parametrize("name", NATIVE + list(FALLBACK))
def test_two_ranks_give_the_logits_of_one(name, model_dirs, tp2):
    expected = prefill_then_decode_logits(ModelRunner(_runner_config(model_dirs[name])))
    for rank_logits in tp2[name]:
        assert not isinstance(rank_logits, str), rank_logits
        for got, want in zip(rank_logits, expected, strict=True):
            assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


def test_fallback_without_a_tp_plan_is_refused_at_tp2(tp2):
    for message in tp2["no_tp_plan"]:
        assert isinstance(message, str) and "has no base_model_tp_plan" in message


def test_fallback_with_fewer_kv_heads_than_ranks_is_refused_at_tp2(tp2):
    for message in tp2["one_kv_head"]:
        assert isinstance(message, str) and "do not split over 2 ranks" in message
