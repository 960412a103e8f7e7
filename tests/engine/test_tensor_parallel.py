"""Tensor parallelism on CPU over gloo: the tiny Llama gives the same logits and the same tokens at
TP=2 as at TP=1, both rank by rank (two runners in two processes) and through `LLM` (the
multiprocess executor), and the KV cache of each rank holds its share of the kv heads."""

from __future__ import annotations

import dataclasses
import multiprocessing
import re
import socket
import traceback
from pathlib import Path

import psutil
import pytest
import torch
from torch.testing import assert_close

from paphos import LLM, SamplingParams
from paphos.config import EngineConfig
from paphos.layers.sampler import RequestSamplingState
from paphos.parallel import destroy_distributed, init_distributed
from paphos.runner.inputs import RunnerRequestState, build_step_inputs
from paphos.runner.model_runner import ModelRunner

BLOCK_SIZE = 16
NUM_BLOCKS = 16
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], list(range(20, 57)), [3, 1, 4, 1, 5, 9, 2, 6, 5]]
TIMEOUT_S = 120
ENGINE_KWARGS = dict(device="cpu", dtype="float32", kv_cache_space=0.002, skip_tokenizer_init=True)


def _runner_config(model_dir: Path) -> EngineConfig:
    return EngineConfig.from_kwargs(
        model=str(model_dir),
        dtype="float32",
        skip_tokenizer_init=True,
        block_size=BLOCK_SIZE,
        num_blocks_override=NUM_BLOCKS,
        device="cpu",
        num_threads=1,
    )


def _state(runner: ModelRunner, rid: str, tokens: list[int], blocks: list[int], computed: int):
    params = SamplingParams(temperature=0)
    sampling = RequestSamplingState(params, tokens, [], None, runner.vocab_size, runner.device)
    return RunnerRequestState(rid, list(tokens), len(tokens), [blocks], computed, sampling)


def _step_logits(runner: ModelRunner, states, counts) -> torch.Tensor:
    """Logits of every scheduled token of one step (not only the sampled ones)."""
    inputs = build_step_inputs(states, counts, BLOCK_SIZE, runner.device, runner.num_state_slots)
    num_tokens = inputs.input_ids.shape[0]
    indices = torch.arange(num_tokens)  # [num_tokens]
    metadata = dataclasses.replace(inputs.attn_metadata, logits_indices=indices)
    with torch.inference_mode():
        hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, metadata)
        return runner.model.compute_logits(hidden, metadata)  # [num_tokens, vocab]


def prefill_then_decode_logits(runner: ModelRunner) -> list[torch.Tensor]:
    """Step 1: two prompts prefilled together. Step 2: both decode one token through the cache."""
    runner.initialize_kv_cache(NUM_BLOCKS)
    a, b = PROMPTS[0], PROMPTS[1]
    states = [_state(runner, "a", a, [0], 0), _state(runner, "b", b, [1, 2, 3], 0)]
    if runner.num_state_slots is not None:  # a hybrid model: each request holds a state slot
        states[0].state_slot, states[1].state_slot = 1, 0
    first = _step_logits(runner, states, [len(a), len(b)])
    for state, token in zip(states, (17, 33), strict=True):
        state.num_computed_tokens = len(state.token_ids)
        state.token_ids.append(token)
    second = _step_logits(runner, states, [1, 1])
    return [first, second]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank, port, rank_fn, args, results) -> None:
    """One spawned rank: join the gloo group, run rank_fn(parallel, *args), send back its result
    (numpy, not tensors: torch would pass tensors by shared memory, gone once we exit)."""
    try:
        parallel = init_distributed(rank, 2, "gloo", f"tcp://127.0.0.1:{port}")
        results.put((rank, rank_fn(parallel, *args), None))
    except BaseException:  # noqa: BLE001 - reported to the test process
        results.put((rank, None, traceback.format_exc()))
    finally:
        destroy_distributed()


def run_on_two_ranks(rank_fn, *args, timeout_s: float = TIMEOUT_S) -> dict[int, object]:
    """rank_fn(parallel, *args) on ranks 0 and 1 (spawned processes over gloo; rank_fn a
    module-level function): {rank: its result}. A rank's exception fails the test with its
    traceback; no process outlives the call."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    procs = [
        context.Process(target=_rank_entry, args=(rank, port, rank_fn, args, results))
        for rank in range(2)
    ]
    try:
        for p in procs:
            p.start()
        out = {}
        for _ in procs:
            rank, result, error = results.get(timeout=timeout_s)
            assert error is None, f"rank {rank} failed:\n{error}"
            out[rank] = result
        return out
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


def _model_logits(parallel, model_dir: str) -> list:
    runner = ModelRunner(_runner_config(Path(model_dir)), parallel)
    return [t.numpy() for t in prefill_then_decode_logits(runner)]


def _run_two_ranks(model_dir: Path) -> dict[int, list[torch.Tensor]]:
    by_rank = run_on_two_ranks(_model_logits, str(model_dir))
    return {rank: [torch.from_numpy(a) for a in logits] for rank, logits in by_rank.items()}


@pytest.fixture(autouse=True)
def no_process_left_behind():
    # Processes alive before the test (a session-scoped server of tests/serve) are not its own.
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    yield
    left = [
        c
        for c in psutil.Process().children(recursive=True)
        if c.pid not in before and "resource_tracker" not in " ".join(c.cmdline())
    ]
    for child in left:
        child.kill()
    assert not left, f"processes left behind: {left}"


def test_two_ranks_give_the_logits_of_one_rank_in_prefill_and_decode(tiny_llama_dir):
    expected = prefill_then_decode_logits(ModelRunner(_runner_config(tiny_llama_dir)))
    by_rank = _run_two_ranks(tiny_llama_dir)
    for rank in (0, 1):  # every rank holds the full (all-gathered) logits
        for got, want in zip(by_rank[rank], expected, strict=True):
            assert got.shape == want.shape
            assert_close(got, want, rtol=1e-4, atol=1e-4)


def _generate(model_dir: Path, tp: int, params: list[SamplingParams]):
    with LLM(str(model_dir), tensor_parallel_size=tp, **ENGINE_KWARGS) as llm:
        prompts = [{"prompt_token_ids": p} for p in PROMPTS]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        num_blocks = llm.engine.num_kv_blocks
    return outputs, num_blocks


PARAMS = [
    SamplingParams(temperature=0, max_tokens=12, logprobs=3, prompt_logprobs=2),
    SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
    SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True),
]


@pytest.fixture(scope="module")
def tp1_and_tp2(tiny_llama_dir):
    return _generate(tiny_llama_dir, 1, PARAMS), _generate(tiny_llama_dir, 2, PARAMS)


def test_llm_at_tp2_generates_the_greedy_and_seeded_tokens_of_tp1(tp1_and_tp2):
    (tp1, _), (tp2, _) = tp1_and_tp2
    for one, two in zip(tp1, tp2, strict=True):
        assert len(one.outputs[0].token_ids) > 0
        assert two.outputs[0].token_ids == one.outputs[0].token_ids
        assert two.outputs[0].finish_reason == one.outputs[0].finish_reason


def test_llm_at_tp2_returns_the_logprobs_of_tp1(tp1_and_tp2):
    (tp1, _), (tp2, _) = tp1_and_tp2
    one, two = tp1[0], tp2[0]
    assert len(two.prompt_logprobs) == len(one.prompt_logprobs) == len(PROMPTS[0])
    pairs = list(zip(one.outputs[0].logprobs, two.outputs[0].logprobs, strict=True))
    pairs += list(zip(one.prompt_logprobs[1:], two.prompt_logprobs[1:], strict=True))
    for want, got in pairs:
        assert set(got) == set(want)
        for token_id, logprob in want.items():
            assert got[token_id].logprob == pytest.approx(logprob.logprob, abs=1e-4)


def test_each_rank_caches_half_the_kv_heads_so_tp2_holds_twice_the_blocks(tp1_and_tp2):
    (_, blocks_tp1), (_, blocks_tp2) = tp1_and_tp2
    assert blocks_tp2 == 2 * blocks_tp1


def test_closing_the_tp2_llm_leaves_no_process_group(tp1_and_tp2):
    # (and no worker: the autouse fixture checks the children of this process after every test)
    assert not torch.distributed.is_initialized()


def test_multi_step_decodes_at_tp2_give_the_tokens_of_single_steps_at_tp1(
    tiny_llama_dir, tp1_and_tp2
):
    (tp1, _), _ = tp1_and_tp2
    with LLM(
        str(tiny_llama_dir), tensor_parallel_size=2, num_scheduler_steps=4, **ENGINE_KWARGS
    ) as llm:
        scheduler = llm.engine.scheduler
        schedule, num_steps = scheduler.schedule, []

        def counted():  # noqa: ANN202
            out = schedule()
            num_steps.append(out.num_steps)
            return out

        scheduler.schedule = counted
        prompts = [{"prompt_token_ids": p} for p in PROMPTS[1:]]
        outputs = llm.generate(prompts, PARAMS[1:], use_tqdm=False)  # no logprobs: multi-step
    assert max(num_steps) == 4  # both ranks ran four decode steps per message
    for one, two in zip(tp1[1:], outputs, strict=True):
        assert two.outputs[0].token_ids == one.outputs[0].token_ids


def test_structured_output_at_tp2(tiny_llama_dir):
    """Rank 1 gets SamplingParams without the compiled grammar (it does not pickle) and compiles
    its own; both ranks mask alike, so TP2 gives TP1's constrained tokens."""
    pytest.importorskip("xgrammar")
    kwargs = {k: v for k, v in ENGINE_KWARGS.items() if k != "skip_tokenizer_init"}
    params = [
        SamplingParams(seed=s, max_tokens=20, structured_outputs={"regex": r"[a-c]{2,4}-[0-9]{2}"})
        for s in range(3)
    ]
    outputs = {}
    for tp in (1, 2):
        with LLM(str(tiny_llama_dir), tensor_parallel_size=tp, **kwargs) as llm:
            outs = llm.generate(["The quick brown fox"] * 3, params, use_tqdm=False)
            outputs[tp] = [o.outputs[0].text for o in outs]
    assert outputs[2] == outputs[1]
    assert all(re.fullmatch(r"[a-c]{2,4}-[0-9]{2}", text) for text in outputs[2])
