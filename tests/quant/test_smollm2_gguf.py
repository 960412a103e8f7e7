"""The default SmolLM2-135M Q4_1 file runs kept quantized by default: its weights take the file's
tensor bytes (within 1.15x), and its greedy continuations of workload W equal the fp32 reference
(the products use the file's dequantized values with fp32 activations, so they agree as the
dequantized-weights model does)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from paphos import LLM, SamplingParams
from paphos.config import default_model_path
from paphos.gguf_file import read_gguf_metadata
from paphos.quant.gguf import GGUFLinearMethod
from paphos.runner.model_runner import weight_bytes

DATA = Path(__file__).resolve().parents[1] / "data"
NUM_PROMPTS, NUM_TOKENS = 8, 32


@pytest.fixture(scope="module")
def llm():
    with LLM(dtype="float32", kv_cache_space=0.25) as llm:
        yield llm


def test_the_default_model_is_kept_quantized_within_1_15x_of_its_file(llm):
    model = llm.engine.executor.runner.model
    assert llm.engine.config.model.quant_method == "gguf"
    assert isinstance(model.model.layers[0].mlp.down_proj.linear_method, GGUFLinearMethod)
    assert model.lm_head.projection()[0] is model.model.embed_tokens  # tied, Q8_0 blocks
    file_bytes = sum(t.num_bytes for t in read_gguf_metadata(default_model_path()).tensors)
    assert weight_bytes(model) <= 1.15 * file_bytes


def test_workload_greedy_equals_the_fp32_reference(llm):
    prompts = [p["ids"] for p in json.loads((DATA / "workload_w.json").read_text())["prompts"]]
    reference = json.loads((DATA / "reference_outputs_fp32.json").read_text())["outputs"]
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts[:NUM_PROMPTS]], params, use_tqdm=False
    )
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == reference[i][:NUM_TOKENS], f"prompt {i}"
