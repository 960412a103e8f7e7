"""GGUF files of the configurable decoder's families and of GPT-2, written from a tiny random model
as llama.cpp's converter writes them (its tensor names; Gemma's norms stored as 1 + w; no q/k
permutation outside Llama; GPT-2's Conv1D matrices transposed, its head a copy of the embedding),
load into our model and give transformers' logits (GPT-2 kept Q8_0: the dequantized file's)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from paphos import LLM, SamplingParams
from tests.models.hf_compare import check_mixed_batch
from tests.models.test_gpt_phi_families import GPT
from tests.models.zoo_harness import check_paged_logits, make_runner_for, make_tiny_model

_NAMES = {  # HF module -> llama.cpp tensor, per architecture
    "qwen2": {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    },
}
_NAMES["gemma3"] = {
    **_NAMES["qwen2"],
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_NAMES["gemma2"] = {k: v for k, v in _NAMES["gemma3"].items() if "_norm" not in k}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _gguf_name(arch: str, hf_name: str) -> str:
    module, suffix = hf_name.rsplit(".", 1)
    if module in _TOP:
        return f"{_TOP[module]}.{suffix}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{_NAMES[arch][rest]}.{suffix}"


def write_gguf(path: Path, arch: str, hf: torch.nn.Module) -> None:
    config = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    params = config.rope_parameters
    writer.add_rope_freq_base(params.get("full_attention", params)["rope_theta"])
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(config.sliding_window)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        values = tensor.float().numpy()
        if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            values = values + 1.0  # llama.cpp stores Gemma's zero-centred norms as 1 + w
        writer.add_tensor(_gguf_name(arch, name), np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


CASES = {
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "gemma2": (  # its soft-caps and query scalar are not in GGUF metadata: the defaults
        "Gemma2Config",
        dict(head_dim=32, sliding_window=8, query_pre_attn_scalar=256,
             attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    ),
    "gemma3": (  # what the GGUF metadata implies: default scalar, window pattern, local base
        "Gemma3TextConfig",
        dict(head_dim=32, sliding_window=8, num_hidden_layers=7, query_pre_attn_scalar=256),
    ),
}  # fmt: skip


@pytest.mark.parametrize("arch", list(CASES))
def test_gguf_written_like_llama_cpp_gives_transformers_logits(tmp_path, arch):
    config_class, overrides = CASES[arch]
    hf = make_tiny_model(tmp_path, config_class, **overrides)
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(path, arch, hf)
    check_paged_logits(hf, make_runner_for(str(path)))


_GPT2_NAMES = {  # HF GPT-2 module -> llama.cpp tensor (its converter's GPT2Model)
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
_GPT2_TOP = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}
_CONV1D = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")


def write_gpt2_gguf(path: Path, hf: torch.nn.Module, quantize_to=None) -> None:
    """As llama.cpp's converter writes GPT-2: Conv1D matrices transposed to [out, in], attention
    mask buffers dropped, output.weight a copy of token_embd (GPT-2 ties them); `quantize_to` (a
    GGMLQuantizationType) quantizes the matrices as llama-quantize would."""
    config = hf.config
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_name("tiny gpt2")
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    for name, tensor in hf.transformer.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        values = tensor.float().numpy()
        if name.endswith(_CONV1D):
            values = values.T
        module, suffix = name.rsplit(".", 1)
        if module in _GPT2_TOP:
            gguf_name = f"{_GPT2_TOP[module]}.{suffix}"
        else:
            _, layer, rest = module.split(".", 2)
            gguf_name = f"blk.{layer}.{_GPT2_NAMES[rest]}.{suffix}"
        names = [gguf_name] + (["output.weight"] if gguf_name == "token_embd.weight" else [])
        for out_name in names:
            data = np.ascontiguousarray(values)
            if quantize_to is not None and data.ndim == 2 and "blk." in out_name:
                data = gguf.quants.quantize(data, quantize_to)
                writer.add_tensor(out_name, data, raw_dtype=quantize_to)
            else:
                writer.add_tensor(out_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gpt2_gguf_written_like_llama_cpp_gives_transformers_logits(tmp_path):
    config = transformers.GPT2Config(**GPT, n_inner=None, initializer_range=0.2)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).float().eval()
    path = tmp_path / "tiny-gpt2.gguf"
    write_gpt2_gguf(path, hf)
    runner = make_runner_for(str(path))
    assert type(runner.model).__name__ == "GPT2LMHeadModel"
    check_mixed_batch(hf, runner)


def test_gpt2_gguf_kept_quantized_gives_the_dequantized_logits(tmp_path):
    """Q8_0 matrices kept as blocks (stored [out, in]: not transposed back as dense Conv1D
    weights are) give the logprobs of the same file dequantized at load."""
    config = transformers.GPT2Config(**GPT, n_inner=None, initializer_range=0.2)
    torch.manual_seed(0)
    path = tmp_path / "tiny-gpt2-q8_0.gguf"
    write_gpt2_gguf(path, transformers.GPT2LMHeadModel(config).float().eval(),
                    gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    prompt = list(range(3, 43))
    params = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=1, logprobs=1)
    runs = {}
    for quantization in ("auto", "none"):
        settings = dict(dtype="float32", skip_tokenizer_init=True, kv_cache_space=0.01)
        with LLM(model=str(path), quantization=quantization, device="cpu", **settings) as llm:
            kept = quantization == "auto"
            assert llm.engine.config.model.quant_method == ("gguf" if kept else None)
            c_attn = llm.engine.executor.runner.model.transformer.h[0].attn.c_attn
            types = [p.ggml_type for p in getattr(c_attn, "gguf_parts", ())]
            assert types == ([gguf.GGMLQuantizationType.Q8_0] if kept else [])
            out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        runs[quantization] = [e[prompt[i]].logprob for i, e in enumerate(out.prompt_logprobs) if e]
        runs[quantization + " tokens"] = out.outputs[0].token_ids
    assert runs["auto tokens"] == runs["none tokens"]
    np.testing.assert_allclose(runs["auto"], runs["none"], atol=1e-3, rtol=0)
