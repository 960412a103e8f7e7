"""paphos end to end on CUDA: tiny Llama vs transformers (logits and greedy tokens), CUDA-graph
replay vs eager, Triton backend vs the torch reference backend on the engine invariance workload,
KV cache sizing from a profiled step. On the device: `pytest -m gpu tests/gpu/test_engine_cuda.py`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from paphos import LLM, SamplingParams
from paphos.config import EngineConfig
from paphos.layers.sampler import RequestSamplingState
from paphos.runner.inputs import RunnerRequestState, build_step_inputs
from paphos.runner.model_runner import ModelRunner

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

VOCAB = 199
BLOCK_SIZE = 16
SHARED_PREFIX = list(range(10, 50))  # 40 tokens, shared by half the prompts


@pytest.fixture(scope="module")
def peaked_llama(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    """A tiny random Llama (GQA) whose output layer is scaled up: peaked distributions, so greedy
    tokens sit far from ties and kernels of different rounding agree on them."""
    path = tmp_path_factory.mktemp("peaked_llama_cuda")
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
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path)
    return path, model.eval()


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    prompts = []
    for i, n in enumerate((3, 20, 35, 9, 50, 17)):
        tail = torch.randint(3, VOCAB, (n,), generator=gen).tolist()
        prompts.append(SHARED_PREFIX + tail if i % 2 else tail)
    return prompts


def _cuda_llm(path: Path, **engine_kwargs) -> LLM:  # noqa: ANN003
    """The tiny model on CUDA in float32, up to 8 requests over 128 KV blocks."""
    kwargs = dict(
        dtype="float32",
        skip_tokenizer_init=True,
        device="cuda",
        max_num_seqs=8,
        num_blocks_override=128,
    )
    kwargs.update(engine_kwargs)
    return LLM(model=str(path), **kwargs)


def _generate(path: Path, one_by_one: bool = False, logprobs: int | None = 2, **engine_kwargs):
    """Greedy outputs (different lengths, so the decode batch shrinks through several graph
    buckets) and the runner's host stats."""
    llm = _cuda_llm(path, **{"enable_prefix_caching": False, **engine_kwargs})
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    params = [
        SamplingParams(temperature=0, max_tokens=8 + 3 * i, ignore_eos=True, logprobs=logprobs)
        for i in range(len(prompts))
    ]
    if one_by_one:
        outs = [llm.generate(p, sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    engine = llm.engine
    engine.scheduler.check_invariants()
    stats = engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks, "blocks leaked after all requests ended"
    host_stats = engine.executor.runner.host_stats
    llm.close()
    return outs, host_stats


def _assert_same(expected, actual, logprob_tol: float):
    for e, a in zip(expected, actual):
        assert a.outputs[0].token_ids == e.outputs[0].token_ids
        for e_pos, a_pos in zip(e.outputs[0].logprobs, a.outputs[0].logprobs):
            assert e_pos.keys() == a_pos.keys()
            for token_id, lp in e_pos.items():
                assert a_pos[token_id].logprob == pytest.approx(lp.logprob, abs=logprob_tol)


@pytest.fixture(scope="module")
def graph_run(peaked_llama):
    return _generate(peaked_llama[0])


def test_decode_steps_replay_cuda_graphs_and_equal_eager(peaked_llama, graph_run):
    graph_outs, graph_stats = graph_run
    eager_outs, eager_stats = _generate(peaked_llama[0], enforce_eager=True)
    assert graph_stats.num_graph_steps > 0
    assert eager_stats.num_graph_steps == 0
    _assert_same(eager_outs, graph_outs, logprob_tol=1e-4)


def test_plain_greedy_steps_take_the_argmax_computed_in_the_graph(peaked_llama, graph_run):
    outs, stats = _generate(peaked_llama[0], logprobs=None)  # no logprobs: the argmax fast path
    assert stats.num_graph_steps > 0
    for expected, actual in zip(graph_run[0], outs):
        assert actual.outputs[0].token_ids == expected.outputs[0].token_ids


def test_triton_backend_equals_torch_reference_backend(peaked_llama, graph_run, monkeypatch):
    monkeypatch.setattr("paphos.kernels.CUDA_KERNELS", {})  # pick() falls back to the references
    reference_outs, _ = _generate(peaked_llama[0], enforce_eager=True)
    _assert_same(reference_outs, graph_run[0], logprob_tol=1e-3)


def test_one_at_a_time_equals_batched_on_cuda(peaked_llama, graph_run):
    outs, _ = _generate(peaked_llama[0], one_by_one=True)
    _assert_same(graph_run[0], outs, logprob_tol=1e-4)


def test_preemption_chunking_and_prefix_caching_do_not_change_outputs(peaked_llama, graph_run):
    outs, _ = _generate(
        peaked_llama[0],
        num_blocks_override=12,
        max_num_batched_tokens=32,
        enable_prefix_caching=True,
    )
    _assert_same(graph_run[0], outs, logprob_tol=1e-4)


def test_overlapped_steps_equal_one_step_at_a_time_on_cuda(peaked_llama, graph_run):
    outs, stats = _generate(peaked_llama[0], async_scheduling=False)  # graph_run overlaps
    assert stats.num_graph_steps > 0
    _assert_same(outs, graph_run[0], logprob_tol=1e-4)


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_multi_step_decodes_equal_single_steps_on_cuda(peaked_llama, graph_run, enforce_eager):
    outs, stats = _generate(
        peaked_llama[0], logprobs=None, num_scheduler_steps=4, enforce_eager=enforce_eager
    )
    assert stats.num_forwards >= stats.num_steps + 10  # several decode steps per step
    assert (stats.num_graph_steps > 0) != enforce_eager
    for expected, actual in zip(graph_run[0], outs):
        assert actual.outputs[0].token_ids == expected.outputs[0].token_ids


def test_seeded_sampling_is_the_same_in_multi_step_decodes_on_cuda(peaked_llama):
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=i, max_tokens=9 + 2 * i)
        for i in range(len(prompts))
    ]
    results = []
    for num_steps in (1, 5):
        llm = _cuda_llm(peaked_llama[0], num_scheduler_steps=num_steps)
        outs = llm.generate(prompts, params, use_tqdm=False)
        results.append([o.outputs[0].token_ids for o in outs])
        llm.close()
    assert results[0] == results[1]


def test_cuda_overlaps_plain_greedy_graph_steps_by_default(peaked_llama):
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = {}
    for overlap in (None, False):
        # one engine step per token: the overlap counts them
        llm = _cuda_llm(peaked_llama[0], async_scheduling=overlap, num_scheduler_steps=1)
        outs = llm.generate(prompts, params, use_tqdm=False)
        results[overlap] = [o.outputs[0].token_ids for o in outs]
        engine = llm.engine
        assert engine.executor.runner.host_stats.num_graph_steps > 15
        assert (engine.num_overlapped_steps > 15) == (overlap is None)
        llm.close()
    assert results[None] == results[False]


def test_greedy_tokens_equal_hf_generate_on_cuda(peaked_llama, graph_run):
    hf = peaked_llama[1].to("cuda")
    for prompt, out in zip(_prompts(), graph_run[0]):
        n = len(out.outputs[0].token_ids)
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt], device="cuda"),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert out.outputs[0].token_ids == ref
    hf.to("cpu")


def _runner(path: Path, **kwargs) -> ModelRunner:
    config = EngineConfig.from_kwargs(
        model=str(path),
        dtype="float32",
        skip_tokenizer_init=True,
        block_size=BLOCK_SIZE,
        device="cuda",
        **kwargs,
    )
    return ModelRunner(config)


def _state(runner: ModelRunner, rid: str, tokens: list[int], blocks: list[int], computed: int):
    sampling = RequestSamplingState(
        SamplingParams(temperature=0), tokens, [], None, runner.vocab_size, runner.device
    )
    return RunnerRequestState(rid, list(tokens), len(tokens), [blocks], computed, sampling)


def _all_logits(runner: ModelRunner, states, counts) -> torch.Tensor:
    inputs = build_step_inputs(states, counts, BLOCK_SIZE, runner.device)
    num_tokens = inputs.input_ids.shape[0]
    metadata = dataclasses.replace(
        inputs.attn_metadata, logits_indices=torch.arange(num_tokens, device="cuda")
    )
    with torch.inference_mode():
        hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, metadata)
        return runner.model.compute_logits(hidden, metadata)  # [num_tokens, vocab]


def test_prefill_decode_and_mixed_logits_match_transformers_on_cuda(peaked_llama):
    path, hf = peaked_llama
    hf.to("cpu")
    runner = _runner(path, num_blocks_override=64, enforce_eager=True)
    runner.initialize_kv_cache(64)
    gen = torch.Generator().manual_seed(3)
    a, c = (torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (30, 45))
    with torch.no_grad():
        hf_a, hf_c = (hf(torch.tensor([t])).logits[0].float() for t in (a, c))
    sa, sc = _state(runner, "a", a, [20, 21], 0), _state(runner, "c", c, [9, 3, 30], 0)
    first = _all_logits(runner, [sa, sc], [29, 17]).cpu()  # a's prompt but 1, c's first chunk
    torch.testing.assert_close(first[:29], hf_a[:29], atol=2e-3, rtol=1e-3)
    sa.num_computed_tokens, sc.num_computed_tokens = 29, 17
    mixed = _all_logits(runner, [sc, sa], [28, 1]).cpu()  # rest of c with context, decode of a
    torch.testing.assert_close(mixed[:28], hf_c[17:45], atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(mixed[28], hf_a[29], atol=2e-3, rtol=1e-3)


def test_kv_cache_is_sized_from_a_profiled_step_and_too_little_memory_is_a_clear_error(
    peaked_llama,
):
    runner = _runner(peaked_llama[0], gpu_memory_utilization=0.05)
    num_blocks = runner.determine_num_blocks().num_blocks
    spec = runner.kv_cache_spec()
    _, total = torch.cuda.mem_get_info()
    assert 0 < num_blocks * spec.bytes_per_block <= 0.05 * total
    starved = _runner(peaked_llama[0], gpu_memory_utilization=1e-7)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        starved.determine_num_blocks()
