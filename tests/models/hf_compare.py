"""Shared checks of a paphos model against the transformers model it came from (tiny random
models, float32): logprobs of every token of a batch that mixes prefill chunks, a chunk with cached
context and decodes through the paged cache; greedy tokens against HF `generate`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from paphos import LLM, SamplingParams
from paphos.config import EngineConfig
from paphos.layers.sampler import RequestSamplingState
from paphos.runner.inputs import RunnerRequestState, build_step_inputs
from paphos.runner.model_runner import ModelRunner
from paphos.sampling_params import SamplingParams as SP

BLOCK_SIZE = 16
NUM_BLOCKS = 32
LOGPROB_ATOL = 2e-4


INIT_RANGE = 0.2  # HF's default 0.02 leaves tiny models so flat that wrong attention hides in 2e-4


def save_tiny(hf_class: type, hf_config: Any, path: Path, seed: int = 0) -> PreTrainedModel:
    """A random float32 `hf_class(hf_config)` saved to `path` (safetensors); returns it, eval.
    Weights are drawn 10x wider than HF's default so that logprobs vary by ~1 across the
    vocabulary (a wrong scale, rotation or mask then moves them far past the tolerance)."""
    if hasattr(hf_config, "initializer_range"):
        hf_config.initializer_range = INIT_RANGE
    torch.manual_seed(seed)
    model = hf_class(hf_config).float().eval()
    model.save_pretrained(path)
    return model


def build_runner(path: Path, **overrides: Any) -> ModelRunner:
    kwargs = dict(
        model=str(path),
        dtype="float32",
        skip_tokenizer_init=True,
        block_size=BLOCK_SIZE,
        num_blocks_override=NUM_BLOCKS,
        device="cpu",
    )
    config = EngineConfig.from_kwargs(**{**kwargs, **overrides})
    runner = ModelRunner(config)
    runner.initialize_kv_cache(NUM_BLOCKS)
    return runner


def _state(runner: ModelRunner, rid: str, tokens: list[int], blocks: list[int]):
    sampling = RequestSamplingState(
        SP(temperature=0), tokens, [], None, runner.vocab_size, runner.device
    )
    return RunnerRequestState(rid, list(tokens), len(tokens), [blocks], 0, sampling)


def step_logits(runner: ModelRunner, states, counts: list[int]) -> torch.Tensor:
    """Logits [num_tokens, vocab] of every token scheduled (not only the sampled ones); advances
    each state's num_computed_tokens."""
    inputs = build_step_inputs(states, counts, BLOCK_SIZE, runner.device)
    num_tokens = inputs.input_ids.shape[0]
    metadata = dataclasses.replace(inputs.attn_metadata, logits_indices=torch.arange(num_tokens))
    metadata = dataclasses.replace(
        metadata, logits_indices=metadata.logits_indices.to(runner.device)
    )
    with torch.inference_mode():
        hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, metadata)
        logits = runner.model.compute_logits(hidden, metadata).cpu()
    for state, n in zip(states, counts):
        state.num_computed_tokens += n
    return logits


def hf_logprobs(hf: PreTrainedModel, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float().log_softmax(-1)  # [len, vocab]


def check_mixed_batch(
    hf: PreTrainedModel, runner: ModelRunner, seed: int = 3, atol: float = LOGPROB_ATOL
) -> None:
    """Step 1: two prompts nearly whole and a first chunk of a third; step 2: two decodes around
    the third's second chunk (attending to its cached first chunk); then three decode steps of
    all three. Every row's logprobs equal HF's over the whole sequence."""
    gen = torch.Generator().manual_seed(seed)
    vocab = runner.vocab_size
    lengths = {"a": 33, "b": 23, "c": 49}
    tokens = {r: torch.randint(0, vocab, (n,), generator=gen).tolist() for r, n in lengths.items()}
    blocks = {"a": [20, 5, 21], "b": [9, 2], "c": [24, 1, 30, 7]}  # deliberately scattered
    states = {r: _state(runner, r, tokens[r], blocks[r]) for r in tokens}
    schedule = [
        [("a", 29), ("b", 19), ("c", 17)],
        [("a", 1), ("c", 28), ("b", 1)],
        [("c", 1), ("a", 1), ("b", 1)],
        [("b", 1), ("c", 1), ("a", 1)],
        [("a", 1), ("b", 1), ("c", 1)],
    ]
    expected = {r: hf_logprobs(hf, t) for r, t in tokens.items()}
    for step in schedule:
        starts = [states[r].num_computed_tokens for r, _ in step]
        ours = step_logits(runner, [states[r] for r, _ in step], [n for _, n in step])
        ours = ours.log_softmax(-1)
        row = 0
        for (rid, n), start in zip(step, starts):
            torch.testing.assert_close(
                ours[row : row + n], expected[rid][start : start + n], atol=atol, rtol=0
            )
            row += n


def check_greedy(path: Path, hf: PreTrainedModel, max_tokens: int = 16, **llm_kwargs: Any) -> None:
    """Greedy `LLM.generate` equals HF `generate` for prompts of a few lengths, run as one batch;
    both ban EOS for all max_tokens (min_tokens / min_new_tokens), so neither ends early."""
    gen = torch.Generator().manual_seed(4)
    vocab = hf.config.get_text_config().vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (5, 19, 33)]
    kwargs = dict(dtype="float32", skip_tokenizer_init=True, kv_cache_space=0.01, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=max_tokens, min_tokens=max_tokens)
    with LLM(model=str(path), **{**kwargs, **llm_kwargs}) as llm:  # closed: threads unpinned
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,  # bans EOS, as our min_tokens does
                do_sample=False,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert out.outputs[0].token_ids == ref, (out.outputs[0].token_ids, ref)
