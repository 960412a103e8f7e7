"""Our Llama equals transformers' Llama: logits of a prefill, step-by-step decode through the paged
cache, a mixed batch (prefill chunk with cached context + decodes), and greedy tokens of HF
`generate`."""

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

BLOCK_SIZE = 16
VARIANTS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
}


def make_tiny_llama(path: Path, variant: str, num_layers: int = 3) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        **VARIANTS[variant],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def models(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_llama(path, request.param)
    config = EngineConfig.from_kwargs(
        model=str(path),
        dtype="float32",
        skip_tokenizer_init=True,
        block_size=BLOCK_SIZE,
        num_blocks_override=64,
        device="cpu",
    )
    runner = ModelRunner(config)
    runner.initialize_kv_cache(64)
    return hf, runner


def _state(runner: ModelRunner, rid: str, tokens: list[int], blocks: list[int], computed: int):
    from paphos.sampling_params import SamplingParams as SP

    sampling = RequestSamplingState(
        SP(temperature=0), tokens, [], None, runner.vocab_size, runner.device
    )
    return RunnerRequestState(rid, list(tokens), len(tokens), [blocks], computed, sampling)


def _all_logits(runner: ModelRunner, states, counts) -> torch.Tensor:
    """Logits of every scheduled token (not only the sampled ones)."""
    inputs = build_step_inputs(states, counts, BLOCK_SIZE, runner.device)
    num_tokens = inputs.input_ids.shape[0]
    metadata = dataclasses.replace(inputs.attn_metadata, logits_indices=torch.arange(num_tokens))
    with torch.inference_mode():
        hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, metadata)
        return runner.model.compute_logits(hidden, metadata)


def _hf_logits(hf: LlamaForCausalLM, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def test_prefill_logits_match_transformers(models):
    hf, runner = models
    tokens = torch.randint(0, 211, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = _all_logits(runner, [_state(runner, "a", tokens, [0, 1, 2], 0)], [37])
    torch.testing.assert_close(ours, _hf_logits(hf, tokens), atol=2e-5, rtol=1e-4)


def test_decode_step_by_step_through_paged_cache_matches_transformers(models):
    hf, runner = models
    tokens = torch.randint(0, 211, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    expected = _hf_logits(hf, tokens)
    blocks = [7, 3, 11]  # deliberately not contiguous
    first = 5
    _all_logits(runner, [_state(runner, "b", tokens, blocks, 0)], [first])
    for pos in range(first, len(tokens)):
        ours = _all_logits(runner, [_state(runner, "b", tokens, blocks, pos)], [1])
        torch.testing.assert_close(ours[0], expected[pos], atol=2e-5, rtol=1e-4)


def test_mixed_batch_of_chunk_with_context_and_decodes_matches_transformers(models):
    hf, runner = models
    gen = torch.Generator().manual_seed(3)
    a = torch.randint(0, 211, (30,), generator=gen).tolist()
    b = torch.randint(0, 211, (20,), generator=gen).tolist()
    c = torch.randint(0, 211, (45,), generator=gen).tolist()
    sa, sb, sc = (
        _state(runner, "a", a, [20, 21], 0),
        _state(runner, "b", b, [22, 23], 0),
        _state(runner, "c", c, [24, 25, 26], 0),
    )
    _all_logits(
        runner, [sa, sb, sc], [29, 19, 17]
    )  # a and b up to their last token; c a first chunk
    for s, n in ((sa, 29), (sb, 19), (sc, 17)):
        s.num_computed_tokens = n
    ours = _all_logits(runner, [sa, sc, sb], [1, 28, 1])  # decode, rest of c's prompt, decode
    torch.testing.assert_close(ours[0], _hf_logits(hf, a)[29], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours[1:29], _hf_logits(hf, c)[17:45], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours[29], _hf_logits(hf, b)[19], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_greedy_tokens_equal_hf_generate(tmp_path, variant):
    hf = make_tiny_llama(tmp_path, variant)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 211, (n,), generator=gen).tolist() for n in (5, 17, 33)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(
        model=str(tmp_path), dtype="float32", skip_tokenizer_init=True, kv_cache_space=0.01
    ) as llm:  # closed: a left-open engine keeps this process's threads pinned
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == "length"
