"""GGUF files of the configurable decoder's families, written from a tiny random model as
llama.cpp's converter writes them (its tensor names; Gemma's norms stored as 1 + w; no q/k
permutation outside Llama), load into our model and give transformers' logits."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

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
