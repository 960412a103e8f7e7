"""Outputs do not depend on how the engine batches: batch composition, arrival order, preemption
under a tiny KV budget, chunked prefill, prefix caching. Checked on a tiny random Llama whose output
layer is scaled up so that its distributions are peaked (no near-ties to flip a greedy token),
comparing tokens exactly and logprobs within tolerance; and the block pool is whole again
afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from paphos import LLM, SamplingParams

VOCAB = 199
SHARED_PREFIX = list(range(10, 50))  # 40 tokens = 2.5 blocks of 16, shared by half the prompts


@pytest.fixture(scope="module")
def peaked_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("peaked_llama")
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaked distributions: greedy choices far from ties
    model.save_pretrained(path)
    return path


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    prompts = []
    for i, n in enumerate((3, 20, 35, 9, 50, 17)):
        tail = torch.randint(3, VOCAB, (n,), generator=gen).tolist()
        prompts.append(SHARED_PREFIX + tail if i % 2 else tail)
    return prompts


def _generate(path: Path, prompts, order=None, one_by_one=False, **engine_kwargs):
    kwargs = dict(dtype="float32", skip_tokenizer_init=True, kv_cache_space=0.02, device="cpu")
    kwargs.update(engine_kwargs)
    llm = LLM(model=str(path), **kwargs)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)
    order = order or list(range(len(prompts)))
    results = {}
    if one_by_one:
        for i in order:
            results[i] = llm.generate({"prompt_token_ids": prompts[i]}, params, use_tqdm=False)[0]
    else:
        outs = llm.generate(
            [{"prompt_token_ids": prompts[i]} for i in order], params, use_tqdm=False
        )
        results = dict(zip(order, outs))
    engine = llm.engine
    engine.scheduler.check_invariants()
    stats = engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks, "blocks leaked after all requests ended"
    return [results[i] for i in range(len(prompts))], stats


def _assert_same(expected, actual):
    for e, a in zip(expected, actual):
        assert a.outputs[0].token_ids == e.outputs[0].token_ids
        for e_pos, a_pos in zip(e.outputs[0].logprobs, a.outputs[0].logprobs):
            assert e_pos.keys() == a_pos.keys()
            for token_id, lp in e_pos.items():
                assert a_pos[token_id].logprob == pytest.approx(lp.logprob, abs=1e-3)


@pytest.fixture(scope="module")
def baseline(peaked_llama):
    outs, _ = _generate(peaked_llama, _prompts(), enable_prefix_caching=False)
    return outs


def test_batched_equals_one_at_a_time(peaked_llama, baseline):
    outs, _ = _generate(peaked_llama, _prompts(), one_by_one=True, enable_prefix_caching=False)
    _assert_same(baseline, outs)


def test_arrival_order_does_not_change_outputs(peaked_llama, baseline):
    outs, _ = _generate(
        peaked_llama, _prompts(), order=[5, 3, 1, 0, 2, 4], enable_prefix_caching=False
    )
    _assert_same(baseline, outs)


def test_tiny_kv_budget_forces_preemption_without_changing_outputs(peaked_llama, baseline):
    outs, stats = _generate(
        peaked_llama, _prompts(), num_blocks_override=12, enable_prefix_caching=False
    )
    assert stats.num_preemptions > 0
    _assert_same(baseline, outs)


def test_chunked_prefill_with_small_budget_does_not_change_outputs(peaked_llama, baseline):
    outs, _ = _generate(
        peaked_llama, _prompts(), max_num_batched_tokens=8, enable_prefix_caching=False
    )
    _assert_same(baseline, outs)


def test_chunked_prefill_off_does_not_change_outputs(peaked_llama, baseline):
    outs, _ = _generate(
        peaked_llama,
        _prompts(),
        enable_chunked_prefill=False,
        max_num_batched_tokens=512,
        enable_prefix_caching=False,
    )
    _assert_same(baseline, outs)


def test_prefix_caching_hits_and_does_not_change_outputs(peaked_llama, baseline):
    outs, stats = _generate(peaked_llama, _prompts(), one_by_one=True, enable_prefix_caching=True)
    assert stats.prefix_cache_hits > 0
    _assert_same(baseline, outs)


def test_aborted_requests_free_every_block(peaked_llama):
    llm = LLM(
        model=str(peaked_llama), dtype="float32", skip_tokenizer_init=True, kv_cache_space=0.02
    )
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    for i, prompt in enumerate(_prompts()):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
    for _ in range(3):
        engine.step()
    engine.abort_request(["r0", "r3"])
    engine.step()
    engine.abort_request([f"r{i}" for i in range(6)])
    engine.step()
    assert not engine.has_unfinished_requests()
    engine.scheduler.check_invariants()
    stats = engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
