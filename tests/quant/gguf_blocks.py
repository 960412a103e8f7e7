"""GGUF test weights: blocks quantized by the `gguf` package (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or
random valid blocks (the K-quants and IQ4: random bits with small finite fp16 scales), and a tiny
Llama written as a GGUF file with a different type per tensor."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from transformers import LlamaConfig, LlamaForCausalLM

T = GGMLQuantizationType
QUANTIZABLE = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
RANDOM_ONLY = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS)
ALL_TYPES = QUANTIZABLE + RANDOM_ONLY
# byte offsets of the fp16 scales inside one block, per random-only type
_HALF_OFFSETS = {
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
    T.IQ4_NL: (0,),
    T.IQ4_XS: (0,),
}


def random_blocks(
    ggml_type: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator, scale=1e-3
) -> np.ndarray:
    """[rows, row_bytes] uint8 of valid blocks: quantized normals where the gguf package can
    quantize the type, else random bits with fp16 scales in [-scale, scale]."""
    if ggml_type in QUANTIZABLE:
        values = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
        return quantize(values, ggml_type)
    block_elements, block_bytes = GGML_QUANT_SIZES[ggml_type]
    raw = rng.integers(0, 256, size=(rows, cols // block_elements, block_bytes), dtype=np.uint8)
    for offset in _HALF_OFFSETS[ggml_type]:
        halves = rng.uniform(-scale, scale, size=raw.shape[:2]).astype(np.float16)
        raw[:, :, offset : offset + 2] = halves.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


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
# one type per tensor kind: a fused qkv of two types, K-quants on column and row-parallel layers
TINY_TYPES = {
    "attn_q": T.Q4_K,
    "attn_k": T.Q4_K,
    "attn_v": T.Q6_K,
    "attn_output": T.Q8_0,
    "ffn_gate": T.Q4_1,
    "ffn_up": T.Q5_0,
    "ffn_down": T.Q4_K,
    "token_embd": T.Q8_0,
    "output": T.F16,  # a float matrix among blocks: a dense part
}


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=96,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def _gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    base = hf_name.rsplit(".", 1)[0]
    if base in top:
        return top[base]
    _, _, layer, *module = base.split(".")
    return f"blk.{layer}.{_HF_TO_GGUF['.'.join(module)]}"


def write_tiny_quantized_llama(path: str, types: dict = TINY_TYPES, seed: int = 0) -> None:
    """A random tiny Llama as a GGUF file, its matrices in `types` (norms stay F32)."""
    config = tiny_config()
    torch.manual_seed(seed)
    state = LlamaForCausalLM(config).state_dict()
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, "llama")
    writer.add_name("tiny quantized llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for hf_name, tensor in state.items():
        name = _gguf_name(hf_name)
        kind = name.rsplit(".", 1)[-1]
        if tensor.dim() == 1:
            writer.add_tensor(f"{name}.weight", tensor.float().numpy())
            continue
        rows, cols = tensor.shape
        if types[kind] == T.F16:
            writer.add_tensor(f"{name}.weight", tensor.numpy().astype(np.float16))
            continue
        blocks = random_blocks(types[kind], rows, cols, rng)
        writer.add_tensor(f"{name}.weight", blocks, raw_dtype=types[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
