"""Shared checks of a native model against transformers on a tiny random checkpoint: logits of
prompts and of every decode step through the paged cache in mixed batches, and greedy tokens of
`LLM.generate` against HF `generate`. Each family's test module only describes its configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import transformers

from paphos import LLM, SamplingParams
from paphos.config import EngineConfig
from paphos.layers.sampler import RequestSamplingState
from paphos.runner.inputs import RunnerRequestState, build_step_inputs
from paphos.runner.model_runner import ModelRunner
from paphos.sampling_params import SamplingParams as SP

BLOCK_SIZE = 16
VOCAB = 211
LOGPROB_ATOL = 2e-4
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.2,  # large enough scores that soft-caps and windows change the result
)


def make_tiny_model(path: Path, config_class: str, **overrides: Any) -> torch.nn.Module:
    """A random float32 HF model of `config_class` (a transformers name), saved to `path`."""
    config = getattr(transformers, config_class)(**{**TINY, **overrides})
    config._attn_implementation = "eager"  # soft-caps and windows exactly as defined
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # zero-initialized norms and biases would hide a missing load or +1
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
        for name, buffer in model.named_buffers():  # Gemma 4's (saved) per-layer scalars
            if name.endswith("layer_scalar"):
                buffer.add_(torch.randn_like(buffer) * 0.3)
    model.save_pretrained(path)
    return model


def make_runner(path: Path) -> ModelRunner:
    return make_runner_for(str(path))


def make_runner_for(model: str, device: str = "cpu") -> ModelRunner:
    """A float32 runner of `model` (a checkpoint directory or a .gguf file) with 64 blocks."""
    config = EngineConfig.from_kwargs(
        model=model,
        dtype="float32",
        skip_tokenizer_init=True,
        block_size=BLOCK_SIZE,
        num_blocks_override=64,
        device=device,
    )
    runner = ModelRunner(config)
    runner.initialize_kv_cache(64)
    return runner


def _state(runner: ModelRunner, rid: str, tokens: list[int], blocks: list[int], computed: int):
    sampling = RequestSamplingState(
        SP(temperature=0), tokens, [], None, runner.vocab_size, runner.device
    )
    state = RunnerRequestState(rid, list(tokens), len(tokens), [blocks], computed, sampling)
    if runner.num_state_slots is not None:  # a hybrid model: a state slot per request, scattered
        state.state_slot = (7 * (ord(rid[0]) - ord("a")) + 3) % runner.num_state_slots
    return state


def _all_logits(runner: ModelRunner, states, counts) -> torch.Tensor:
    """Logits of every scheduled token (not only the sampled ones)."""
    inputs = build_step_inputs(states, counts, BLOCK_SIZE, runner.device, runner.num_state_slots)
    num_tokens = inputs.input_ids.shape[0]
    every_token = torch.arange(num_tokens, device=runner.device)  # [num_tokens]
    metadata = dataclasses.replace(inputs.attn_metadata, logits_indices=every_token)
    with torch.inference_mode():
        hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, metadata)
        return runner.model.compute_logits(hidden, metadata)


def _hf_logprobs(hf: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float().log_softmax(-1)


def _assert_logprobs(
    ours: torch.Tensor, expected: torch.Tensor, what: str, atol: float = LOGPROB_ATOL
) -> None:
    got = ours.float().cpu().log_softmax(-1)
    err = (got - expected).abs().max().item()
    assert err <= atol, f"{what}: max logprob error {err:.2e}"


def check_paged_logits(
    hf: torch.nn.Module, runner: ModelRunner, atol: float = LOGPROB_ATOL
) -> None:
    """Three sequences (45, 30, 40 tokens): prefill chunks beside decodes, then decodes of two
    at once, every token's logprobs against transformers' forward of the whole sequence."""
    gen = torch.Generator().manual_seed(3)
    a, b, c = (torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (45, 30, 40))
    ref = {name: _hf_logprobs(hf, toks) for name, toks in (("a", a), ("b", b), ("c", c))}
    sa = _state(runner, "a", a, [20, 5, 21], 0)  # blocks deliberately not contiguous
    sb = _state(runner, "b", b, [7, 30], 0)
    sc = _state(runner, "c", c, [40, 11, 2], 0)
    # step 1: a's first chunk (17) and b's prompt but its last token
    _assert_logprobs(
        _all_logits(runner, [sa, sb], [17, 29])[:17], ref["a"][:17], "a[:17]", atol=atol
    )
    sa.num_computed_tokens, sb.num_computed_tokens = 17, 29
    # step 2: decode b, rest of a's prompt but 5, all of c's prompt but 10
    out = _all_logits(runner, [sb, sa, sc], [1, 23, 30])
    _assert_logprobs(out[0], ref["b"][29], "b[29]", atol=atol)
    _assert_logprobs(out[1:24], ref["a"][17:40], "a[17:40]", atol=atol)
    _assert_logprobs(out[24:], ref["c"][:30], "c[:30]", atol=atol)
    sa.num_computed_tokens, sc.num_computed_tokens = 40, 30
    for step in range(5):  # decodes of a and c together
        out = _all_logits(runner, [sc, sa], [1, 1])
        _assert_logprobs(out[0], ref["c"][30 + step], f"c[{30 + step}]", atol=atol)
        _assert_logprobs(out[1], ref["a"][40 + step], f"a[{40 + step}]", atol=atol)
        sa.num_computed_tokens += 1
        sc.num_computed_tokens += 1


def check_greedy(
    hf: torch.nn.Module, path: Path, max_tokens: int = 12, device: str = "cpu"
) -> None:
    """Greedy tokens of LLM.generate equal HF generate without EOS stops (ignore_eos: EOS may be
    generated and decoding goes on, as HF with eos_token_id=None)."""
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 33)]
    llm = LLM(
        model=str(path),
        dtype="float32",
        skip_tokenizer_init=True,
        kv_cache_space=0.01,
        device=device,
    )
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.close()  # an open engine keeps the process's threads pinned
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, max_tokens)


def hf_greedy(hf: torch.nn.Module, prompt: list[int], num_tokens: int) -> list[int]:
    """HF `generate`'s greedy tokens after prompt, no EOS stop."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=num_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()
