"""GGUF: our metadata, config, weights and tokenizer equal transformers' for the same files.

A tiny Llama written here as GGUF (q/k permuted as llama.cpp's converter does) checks the exact
round trip; the packaged SmolLM2 Q4_1 file checks parity with transformers' own GGUF loading.
"""

from __future__ import annotations

import json
import math
import os

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from paphos import LLM, SamplingParams
from paphos.config import ModelConfig, default_model_path, resolve_model_config
from paphos.gguf_file import (
    gguf_to_hf_name,
    hf_config_from_gguf,
    read_gguf_metadata,
    read_gguf_tensors,
)
from paphos.models.loader import iterate_weights
from paphos.tokenizer import apply_chat_template, eos_token_ids, get_tokenizer

WORKLOAD = os.path.join(os.path.dirname(__file__), os.pardir, "data", "workload_w.json")
_VOLATILE_CONFIG_KEYS = {"architectures", "transformers_version", "_name_or_path"}


def _llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows (written from its description)."""
    head_dim = weights.shape[0] // num_heads
    # [num_heads, 2, head_dim // 2, *rest] -> [num_heads, head_dim // 2, 2, *rest]
    split = weights.reshape(num_heads, 2, head_dim // 2, *weights.shape[1:])
    return split.swapaxes(1, 2).reshape(weights.shape)


_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    if hf_name in top:
        return top[hf_name]
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, *module, suffix = hf_name.split(".")
    return f"blk.{layer}.{_HF_TO_GGUF['.'.join(module)]}.{suffix}"


def _write_tiny_llama_gguf(
    path: str,
    config: LlamaConfig,
    state: dict[str, torch.Tensor],
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for hf_name, tensor in state.items():
        values = tensor.numpy()
        if ".q_proj." in hf_name:
            values = _llama_cpp_permute(values, config.num_attention_heads)
        elif ".k_proj." in hf_name:
            values = _llama_cpp_permute(values, config.num_key_value_heads)
        writer.add_tensor(_gguf_name(hf_name), np.ascontiguousarray(values, dtype=np.float32))
    for name, values in (extra_tensors or {}).items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=5000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    _write_tiny_llama_gguf(path, config, state)
    return path, state


def test_tiny_gguf_weights_round_trip_exactly_with_qk_unpermuted(tiny_gguf):
    path, state = tiny_gguf
    ours = dict(read_gguf_tensors(path))
    assert set(ours) == set(state)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, state[name]), name


def test_tiny_gguf_config_matches_transformers(tiny_gguf):
    path, _ = tiny_gguf
    ours = hf_config_from_gguf(path)
    theirs = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    assert ours.architectures == ["LlamaForCausalLM"]
    assert ours.tie_word_embeddings is False  # output.weight is present
    assert ours.vocab_size == 96 and ours.head_dim == 8
    assert _comparable(ours) == _comparable(theirs)


def test_loader_auto_format_reads_gguf(tiny_gguf):
    path, state = tiny_gguf
    config = resolve_model_config(ModelConfig(model=path))
    assert config.gguf_file == path
    assert {name for name, _ in iterate_weights(config)} == set(state)


def _comparable(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}


def test_unknown_gguf_tensor_name_raises():
    with pytest.raises(ValueError, match="blk.0.attn_qkv.weight"):
        gguf_to_hf_name("blk.0.attn_qkv.weight")
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        gguf_to_hf_name("rope_freqs.weight")
    assert gguf_to_hf_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    assert gguf_to_hf_name("output.weight") == "lm_head.weight"


def test_unknown_architecture_and_non_gguf_files_raise(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'mamba'"):
        hf_config_from_gguf(str(tmp_path / "m.gguf"))
    with pytest.raises(ValueError, match="'mamba'"):
        next(read_gguf_tensors(str(tmp_path / "m.gguf")))
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(40))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_metadata(str(tmp_path / "x.gguf"))


# --- the packaged SmolLM2-135M-Instruct Q4_1 file -------------------------------------------


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    return default_model_path()


@pytest.fixture(scope="module")
def hf_smollm2_config(smollm2_path):
    directory, name = os.path.split(smollm2_path)
    return AutoConfig.from_pretrained(directory, gguf_file=name)


def test_metadata_reader_matches_gguf_reader(smollm2_path):
    ours = read_gguf_metadata(smollm2_path)
    reader = gguf.GGUFReader(smollm2_path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields == ours.metadata
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    expected = [
        (t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type, t.data_offset, t.n_bytes)
        for t in reader.tensors
    ]
    assert [tuple(t) for t in ours.tensors] == expected


def test_smollm2_config_matches_transformers(smollm2_path, hf_smollm2_config):
    ours = hf_config_from_gguf(smollm2_path)
    assert ours.architectures == ["LlamaForCausalLM"]
    assert ours.tie_word_embeddings is True  # the file has no output.weight
    assert (ours.head_dim, ours.vocab_size, ours.num_key_value_heads) == (64, 49152, 3)
    assert ours.max_position_embeddings == 8192 and ours.eos_token_id == 2
    assert _comparable(ours) == _comparable(hf_smollm2_config)


def test_smollm2_weights_equal_transformers_dequantized(smollm2_path, hf_smollm2_config):
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(hf_smollm2_config)  # only its parameter names are used
    theirs = load_gguf_checkpoint(smollm2_path, return_tensors=True, model_to_load=skeleton)
    theirs = theirs["tensors"]
    count = 0
    for name, tensor in read_gguf_tensors(smollm2_path):
        assert torch.equal(tensor, theirs[name]), name
        count += 1
    assert count == len(theirs) == 272


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    model_config = resolve_model_config(ModelConfig())
    return model_config, get_tokenizer(model_config)


def test_smollm2_tokenizer_encodes_workload_prompts_exactly(smollm2_tokenizer):
    _, tokenizer = smollm2_tokenizer
    with open(WORKLOAD) as f:
        prompts = json.load(f)["prompts"]
    assert len(prompts) == 64
    for prompt in prompts:
        assert tokenizer(prompt["text"]).input_ids == prompt["ids"]
        assert tokenizer.decode(prompt["ids"]) == prompt["text"]


def test_smollm2_chat_template_renders_workload_text(smollm2_tokenizer):
    _, tokenizer = smollm2_tokenizer
    with open(WORKLOAD) as f:
        prompts = json.load(f)["prompts"]
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt["user"]}]
        assert apply_chat_template(tokenizer, messages) == prompt["text"]


def test_smollm2_eos_is_im_end(smollm2_tokenizer):
    model_config, tokenizer = smollm2_tokenizer
    ids = eos_token_ids(model_config, tokenizer)
    assert ids == [2]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|im_end|>"]


# ---- Llama 3.1+ GGUF files: llama3 rope scaling as a rope_freqs tensor ---------------------------


def _llama_cpp_rope_factors(config: LlamaConfig) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs.weight for llama3 rope scaling (the file
    then has no scaling metadata): per frequency, the divisor the scaling applies to it."""
    rope = config.rope_parameters
    head_dim = config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)  # [head_dim // 2]


def test_llama3_gguf_rope_freqs_give_the_llama3_scaled_model(tmp_path):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters=rope,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).float().eval()
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    path = str(tmp_path / "llama3.gguf")
    factors = _llama_cpp_rope_factors(config)
    assert (factors != 1).any() and (factors == 8).any()  # the scaling touches these dims
    _write_tiny_llama_gguf(path, config, state, extra_tensors={"rope_freqs.weight": factors})

    ours = hf_config_from_gguf(path)
    assert ours.rope_freq_factors == pytest.approx(factors.tolist())
    assert {name for name, _ in read_gguf_tensors(path)} == set(state)  # not a weight
    llm = LLM(model=path, dtype="float32", skip_tokenizer_init=True, kv_cache_space=0.01)
    tokens = torch.randint(3, 96, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1, logprobs=1)
    out = llm.generate({"prompt_token_ids": tokens}, params, use_tqdm=False)[0]
    llm.close()  # an open engine keeps the process's threads pinned
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0].log_softmax(-1)  # [150, vocab]
    for position, entry in enumerate(out.prompt_logprobs[1:], start=1):
        token = tokens[position]
        assert entry[token].logprob == pytest.approx(expected[position - 1, token].item(), abs=1e-4)
    assert out.outputs[0].token_ids == [int(expected[-1].argmax())]
