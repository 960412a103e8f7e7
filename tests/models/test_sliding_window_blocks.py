"""Sliding-window layers free the KV blocks no query sees any more (paphos.core.kv_cache_groups).

Mistral (every layer slides), Gemma 2 (alternating) and Gemma 3 (per-layer types) with a window far
shorter than prompt + generation stay exact against transformers (prompt and sampled logprobs,
greedy tokens), their sliding groups hold window-bounded blocks during a long generation, the
runner's tables equal the manager's, the pools are whole after requests end or abort, and chunked
prefill with prefix caching stays exact."""

from __future__ import annotations

import pytest
import torch

from paphos import LLM, SamplingParams
from tests.models.test_zoo import GEMMA3_ROPE
from tests.models.zoo_harness import LOGPROB_ATOL, VOCAB, hf_greedy, make_tiny_model

BLOCK = 8
WINDOW = 8
CASES = {
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW, tie_word_embeddings=False)),
    "gemma2": (
        "Gemma2Config",
        dict(head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=24,
             attn_logit_softcapping=2.0, final_logit_softcapping=5.0),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=24,
             layer_types=["sliding_attention", "sliding_attention", "full_attention"],
             rope_parameters=GEMMA3_ROPE),
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    config_class, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(f"window_{request.param}")
    return path, make_tiny_model(path, config_class, **overrides)


def _llm(path, **kwargs) -> LLM:
    settings = dict(
        dtype="float32",
        skip_tokenizer_init=True,
        block_size=BLOCK,
        kv_cache_space=0.01,
        max_num_batched_tokens=32,  # prompts arrive in chunks
        max_num_seqs=4,
        enable_prefix_caching=True,
        device="cpu",
    )
    return LLM(model=str(path), **{**settings, **kwargs})


def _prompts(*lengths: int, seed: int = 5) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def _assert_logprobs_match(hf, prompt: list[int], output, atol: float = LOGPROB_ATOL) -> None:
    """Prompt logprobs and each sampled position's logprobs equal transformers' forward of the
    whole final sequence."""
    tokens = prompt + list(output.outputs[0].token_ids)
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0].float().log_softmax(-1)  # [len, vocab]
    positions = [(p, entry) for p, entry in enumerate(output.prompt_logprobs) if entry]
    positions += [(len(prompt) + i, e) for i, e in enumerate(output.outputs[0].logprobs)]
    worst = max(
        abs(lp.logprob - ref[p - 1, token].item())
        for p, entry in positions
        for token, lp in entry.items()
    )
    assert worst <= atol, f"max logprob error {worst:.2e}"


def _sliding_groups(kv):
    return [(g, kv.windows[g]) for g in kv.sliding_groups]


def _check_step(engine) -> int:
    """Invariants, window-bounded sliding tables and runner tables equal to the manager's after
    one step; returns the most live blocks any request holds in a sliding group."""
    scheduler = engine.scheduler
    scheduler.check_invariants()
    kv = scheduler.kv_cache_manager
    runner = engine.executor.runner
    most = 0
    for request in scheduler.running:
        ids = kv.get_block_ids(request.request_id)
        state = runner.requests.get(request.request_id)
        if state is not None and state.row is not None:
            for group, table in enumerate(ids):
                mirror = runner.buffers.block_tables[group, state.row, : len(table)].tolist()
                assert mirror == table, f"group {group}: runner table {mirror} != {table}"
        for group, window in _sliding_groups(kv):
            live = [b for b in ids[group] if b != 0]
            # its last step's tokens (at most max_num_batched_tokens) and the window before them
            bound = -(-(window - 1 + 32) // BLOCK) + 1
            assert len(live) <= bound, f"{request.request_id}: {len(live)} live blocks"
            most = max(most, len(live))
    return most


def _assert_pools_whole(engine) -> None:
    kv = engine.scheduler.kv_cache_manager
    kv.check_invariants()
    assert not kv.req_to_blocks
    for pool in kv.pools:
        assert pool.num_free_blocks == pool.num_usable_blocks, "blocks leaked"


def check_exact_with_blocks_freed(path, hf, device: str = "cpu", atol=LOGPROB_ATOL) -> None:
    """Prompt and sampled logprobs and greedy tokens of two requests (prompts in chunks) against
    transformers; sliding blocks were freed and the pools are whole afterwards."""
    prompts = _prompts(37, 21)
    num_tokens = 30
    params = SamplingParams(
        temperature=0, max_tokens=num_tokens, ignore_eos=True, logprobs=2, prompt_logprobs=2
    )
    with _llm(path, device=device) as llm:
        kv = llm.engine.scheduler.kv_cache_manager
        assert kv.sliding_groups, "the model's sliding layers got no group of their own"
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        _assert_pools_whole(llm.engine)
        freed = [kv.pools[g].num_free_blocks for g in kv.sliding_groups]
    assert all(freed)
    for prompt, out in zip(prompts, outs):
        _assert_logprobs_match(hf, prompt, out, atol)
        assert list(out.outputs[0].token_ids) == hf_greedy(hf, prompt, num_tokens)


def check_window_sized_generation(path, hf, device: str = "cpu") -> None:
    """One long generation, step by step: sliding tables window-sized, runner tables equal to
    the manager's, greedy tokens equal to transformers'."""
    prompt = _prompts(40)[0]
    num_tokens = 70  # 110 tokens: 14 blocks of 8 in full layers, ~2 in sliding ones
    with _llm(path, device=device) as llm:
        engine = llm.engine
        params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True)
        engine.add_request("long", {"prompt_token_ids": prompt}, params)
        decode_most, tokens = 0, []
        while engine.has_unfinished_requests():
            for output in engine.step():
                tokens = list(output.outputs[0].token_ids)
            most = _check_step(engine)
            if tokens:  # decoding: one token per step, so the window's blocks and one more
                decode_most = max(decode_most, most)
        assert decode_most <= -(-(WINDOW - 1) // BLOCK) + 2
        kv = engine.scheduler.kv_cache_manager
        if kv.layout.has_full_group:
            assert kv.layout.num_blocks > kv.pools[kv.sliding_groups[0]].num_blocks
        _assert_pools_whole(engine)
    assert tokens == hf_greedy(hf, prompt, num_tokens)


def test_window_shorter_than_the_sequence_is_exact_with_blocks_freed(case):
    check_exact_with_blocks_freed(*case)


def test_sliding_groups_stay_window_sized_during_a_long_generation(case):
    check_window_sized_generation(*case)


def test_pools_are_whole_after_aborts_and_prefix_hits_stay_exact(case):
    path, hf = case
    shared = _prompts(35, seed=9)[0]
    tails = _prompts(6, 13, 3, seed=11)
    prompts = [shared + tail for tail in tails]
    num_tokens = 12
    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True)
    with _llm(path) as llm:
        engine = llm.engine
        engine.add_request("doomed", {"prompt_token_ids": shared + [7] * 20}, params)
        for _ in range(3):
            engine.step()
            _check_step(engine)
        engine.abort_request(["doomed"])
        _assert_pools_whole(engine)
        first = llm.generate({"prompt_token_ids": prompts[0]}, params, use_tqdm=False)
        rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params, use_tqdm=False)
        assert engine.get_stats().prefix_cache_hits > 0
        _assert_pools_whole(engine)
    for prompt, out in zip(prompts, first + rest):
        assert list(out.outputs[0].token_ids) == hf_greedy(hf, prompt, num_tokens)


def test_two_ranks_agree_on_the_groups_and_stay_exact(tmp_path):
    """TP=2 through the multiprocess executor: the ranks' layouts meet group by group and the
    greedy tokens equal transformers' (Gemma 2, one kv head per rank)."""
    config_class, overrides = CASES["gemma2"]
    hf = make_tiny_model(tmp_path, config_class, **overrides)
    prompt = _prompts(30)[0]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    with _llm(tmp_path, tensor_parallel_size=2, num_threads=1) as llm:
        assert len(llm.engine.kv_cache_layout.groups) == 2
        out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        _assert_pools_whole(llm.engine)
    assert list(out.outputs[0].token_ids) == hf_greedy(hf, prompt, 20)
