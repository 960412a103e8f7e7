"""GGUF files: metadata, the transformers config it implies, and HF-named weights (dequantized, or
kept as stored in `GGUFQuantizedTensor`s).

Invariant: what this module yields equals what transformers reads from the same file (config fields,
tensor names, values after undoing llama.cpp's rotary permutation of attn_q/attn_k rows, GPT-2's
Conv1D matrices transposed back to [in, out]). Exceptions: GPT-2's context and MLP sizes go to the
fields GPT2Config reads (n_positions, n_inner; transformers' table names n_ctx), and a GPT-2 matrix
kept quantized stays as stored, [out, in] (blocks cannot be transposed).
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32  # llama.cpp's, when general.alignment is absent

# GGUF metadata value types (GGUFValueType) of fixed width -> struct format.
_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9

# GGUF architecture -> transformers model_type, for the families whose tensors we know how to name.
_MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "gpt2": "gpt2",
}
# Architectures whose q/k rows llama.cpp's converter permuted for its interleaved rotary.
_PERMUTED_QK_ARCHS = frozenset({"llama"})
# Per-dimension rotary frequency divisors llama.cpp writes for Llama 3.1+ (its form of "llama3" rope
# scaling, which then has no metadata keys): read into the config, not loaded as a weight.
ROPE_FREQS = "rope_freqs.weight"
# The config attribute that carries them (head_dim // 2 floats; inv_freq is divided by them).
ROPE_FREQ_FACTORS_ATTR = "rope_freq_factors"

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # a MoE router
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",  # Qwen2-MoE's shared expert and its gate
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# llama.cpp's MoE experts: one 3-D tensor [num_experts, rows, cols] per projection, yielded as
# each expert's matrix (`mlp.experts.{e}.gate_proj.weight`, ...: FusedMoE's checkpoint names)
_EXPERT_NAMES = {
    "ffn_gate_exps": "gate_proj",
    "ffn_up_exps": "up_proj",
    "ffn_down_exps": "down_proj",
}
_STACKED_EXPERTS_RE = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\w+_proj)\.weight")
# Config fields llama.cpp writes that transformers' GGUF table leaves out (None there)
_EXTRA_CONFIG_FIELDS = {
    "qwen3moe": {"expert_feed_forward_length": "moe_intermediate_size"},
    "qwen2moe": {
        "expert_feed_forward_length": "moe_intermediate_size",
        "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
    },
    # Mixtral: llama.cpp files it under llama, with expert counts
    "llama": {"expert_count": "num_local_experts", "expert_used_count": "num_experts_per_tok"},
}
# Where an architecture names a layer tensor otherwise (Gemma 2/3's four norms per layer).
_SANDWICH_NORM_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_ARCH_LAYER_NAMES = {"gemma2": _SANDWICH_NORM_NAMES, "gemma3": _SANDWICH_NORM_NAMES}
# Architectures whose zero-centred norm weights w (scale 1 + w) llama.cpp stores as 1 + w.
_OFFSET_NORM_ARCHS = frozenset({"gemma2", "gemma3"})
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# GPT-2: its own layout (layer prefix, layer and global names); c_attn/c_proj/c_fc are Conv1D.
_GPT2_LAYER_NAMES = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_GPT2_GLOBAL_NAMES = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
_CONV1D_TENSORS = tuple(
    f".{kind}.weight" for kind in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
)
# Config fields transformers' GGUF table maps to names the config class no longer reads.
_CONFIG_RENAMES = {"gpt2": {"n_ctx": "n_positions", "feed_forward_length": "n_inner"}}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


# Types stored as plain floats: yielded as float32 tensors, never kept as blocks.
FLOAT_TYPES = frozenset(
    {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
)


@dataclass(frozen=True)
class GGUFQuantizedTensor:
    """A quantized GGUF matrix kept as stored: row r of `data` holds the blocks of row r.

    `shape`, `dim`, `narrow` and `split` speak in elements, so layers cut it as they cut a dense
    weight (whole rows; along the input only at whole blocks). `dequantize` is the reference.
    """

    ggml_type: GGMLQuantizationType
    data: torch.Tensor  # [rows, row_bytes] uint8
    shape: tuple[int, int]  # (rows, cols) in elements

    @property
    def block_elements(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def block_bytes(self) -> int:
        return GGML_QUANT_SIZES[self.ggml_type][1]

    def dim(self) -> int:
        return 2

    def narrow(self, dim: int, start: int, length: int) -> GGUFQuantizedTensor:
        rows, cols = self.shape
        if dim == 0:
            return GGUFQuantizedTensor(
                self.ggml_type, self.data.narrow(0, start, length), (length, cols)
            )
        if dim != 1:
            raise ValueError(f"a GGUF matrix has dims 0 and 1, not {dim}")
        block = self.block_elements
        if start % block or length % block:
            raise ValueError(
                f"cannot cut columns [{start}, {start + length}) of a {self.ggml_type.name} "
                f"matrix: cuts must fall on whole blocks of {block} elements"
            )
        data = self.data.narrow(
            1, start // block * self.block_bytes, length // block * self.block_bytes
        )
        return GGUFQuantizedTensor(self.ggml_type, data, (rows, length))

    def split(self, sizes: list[int], dim: int = 0) -> list[GGUFQuantizedTensor]:
        starts = np.cumsum([0, *sizes[:-1]])
        return [self.narrow(dim, int(s), n) for s, n in zip(starts, sizes, strict=True)]

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols] through the `gguf` package's dequantizers (the reference)."""
        values = dequantize(self.data.contiguous().numpy(), self.ggml_type)
        return torch.from_numpy(np.array(values, dtype=np.float32).reshape(self.shape))


class GGUFTensorInfo(NamedTuple):
    """One tensor's place in the file. `shape` is in torch order (slowest dimension first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    data_offset: int  # absolute byte offset in the file
    num_bytes: int


@dataclass(frozen=True)
class GGUFContents:
    """A GGUF file's metadata (key -> Python value; arrays are lists) and tensor table."""

    path: str
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensorInfo, ...]

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    @property
    def tensor_names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.tensors)


def read_gguf_metadata(path: str) -> GGUFContents:
    """Parse header, metadata and tensor table without touching tensor data.

    A direct struct walk: gguf.GGUFReader builds one numpy view per array element and takes
    3-5 s on the 100k-string vocabulary of SmolLM2; this takes ~0.1 s and yields the same values.
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _MAGIC:
            raise ValueError(f"{path!r} is not a GGUF file (magic bytes {buf[:4]!r})")
        version, num_tensors, num_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in _VERSIONS:
            raise ValueError(f"{path!r} has GGUF version {version}; supported: {_VERSIONS}")
        pos = 24
        metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key, pos = _read_string(buf, pos)
            (value_type,) = struct.unpack_from("<I", buf, pos)
            metadata[key], pos = _read_value(buf, pos + 4, value_type, path)
        raw_tensors = []
        for _ in range(num_tensors):
            name, pos = _read_string(buf, pos)
            (num_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{num_dims}Q", buf, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * num_dims)
            pos += 4 + 8 * num_dims + 12
            raw_tensors.append((name, tuple(reversed(dims)), ggml_type, offset))
    if "general.architecture" not in metadata:
        raise ValueError(f"{path!r} has no general.architecture in its GGUF metadata")
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = tuple(
        _tensor_info(name, shape, ggml_type, data_start + offset, path)
        for name, shape, ggml_type, offset in raw_tensors
    )
    return GGUFContents(path=path, metadata=metadata, tensors=tensors)


def _read_string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + length
    return buf[pos + 8 : end].decode("utf-8", errors="replace"), end


def _read_value(buf: mmap.mmap, pos: int, value_type: int, path: str) -> tuple[Any, int]:
    if value_type in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[value_type]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if value_type == _STRING:
        return _read_string(buf, pos)
    if value_type != _ARRAY:
        raise ValueError(f"{path!r}: unknown GGUF metadata value type {value_type}")
    element_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if element_type in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[element_type]
        values = list(struct.unpack_from(f"<{count}{fmt[1]}", buf, pos))
        return values, pos + count * struct.calcsize(fmt)
    values = []
    for _ in range(count):
        value, pos = _read_value(buf, pos, element_type, path)
        values.append(value)
    return values, pos


def _tensor_info(
    name: str, shape: tuple[int, ...], ggml_type: int, data_offset: int, path: str
) -> GGUFTensorInfo:
    try:
        qtype = GGMLQuantizationType(ggml_type)
    except ValueError:
        raise ValueError(f"{path!r}: tensor {name!r} has unknown ggml type {ggml_type}") from None
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    num_elements = int(np.prod(shape, dtype=np.int64))
    if shape and shape[-1] % block_size:
        raise ValueError(
            f"{path!r}: tensor {name!r} has rows of {shape[-1]}, not a multiple of {block_size}"
        )
    return GGUFTensorInfo(name, shape, qtype, data_offset, num_elements // block_size * type_size)


def hf_config_from_gguf(path: str) -> Any:
    """The transformers config (e.g. `LlamaConfig`) described by a GGUF file's metadata."""
    from transformers import AutoConfig

    contents = read_gguf_metadata(path)
    model_type = _model_type(contents)
    config_dict = _mapped_config_fields(contents, model_type)
    config_dict["model_type"] = model_type
    config_dict["architectures"] = [_causal_lm_class(model_type)]
    # llama.cpp writes output.weight only when the LM head is not the embedding matrix.
    config_dict["tie_word_embeddings"] = "output.weight" not in contents.tensor_names
    tokens = contents.metadata.get("tokenizer.ggml.tokens")
    if "vocab_size" not in config_dict and tokens is not None:
        config_dict["vocab_size"] = len(tokens)
    _fill_head_dim(contents, config_dict)
    factors = _rope_freq_factors(contents)
    if factors is not None:
        config_dict[ROPE_FREQ_FACTORS_ATTR] = factors
    return AutoConfig.for_model(**config_dict)


def _rope_freq_factors(contents: GGUFContents) -> list[float] | None:
    """The values of the file's rope_freqs tensor (float32), or None when it has none."""
    info = next((t for t in contents.tensors if t.name == ROPE_FREQS), None)
    if info is None:
        return None
    file_data = np.memmap(contents.path, dtype=np.uint8, mode="r")  # [file_size]
    values = dequantize_tensor(file_data, info).reshape(-1)  # [head_dim // 2]
    return [float(v) for v in values]


def _model_type(contents: GGUFContents) -> str:
    arch = contents.architecture
    if arch not in _MODEL_TYPES:
        raise ValueError(
            f"GGUF architecture {arch!r} of {contents.path!r} is not supported; "
            f"supported: {sorted(_MODEL_TYPES)}"
        )
    name = str(contents.metadata.get("general.name", "")).lower()
    if arch == "llama" and "llama.expert_count" in contents.metadata:
        return "mixtral"  # llama.cpp files Mixtral under llama, with experts
    if arch == "llama" and "mistral" in name:
        return "mistral"  # llama.cpp files Mistral under llama; transformers tells them apart so
    return _MODEL_TYPES[arch]


def _mapped_config_fields(contents: GGUFContents, model_type: str) -> dict[str, Any]:
    """Apply transformers' own GGUF key -> config field table (so field names match exactly)."""
    from transformers.integrations import ggml

    GGUF_CONFIG_MAPPING = ggml.GGUF_CONFIG_MAPPING
    arch = contents.architecture
    arch_table = model_type if model_type in GGUF_CONFIG_MAPPING else arch  # gemma3_text: gemma3
    # what llama.cpp assumes where the file says nothing (Qwen3-MoE: norm_topk_prob=True)
    config: dict[str, Any] = dict(
        getattr(ggml, "GGUF_CONFIG_DEFAULTS_MAPPING", {}).get(model_type, {})
    )
    for key, value in contents.metadata.items():
        prefix, _, rest = key.partition(".")
        if prefix == arch:
            prefix = arch_table
        target = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if target is None and prefix == arch_table:
            target = _EXTRA_CONFIG_FIELDS.get(arch, {}).get(rest)
        if target is None or target == -1:
            continue
        config[_CONFIG_RENAMES.get(arch, {}).get(target, target)] = value
    return config


def _causal_lm_class(model_type: str) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    class_name: str = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    return class_name


def _fill_head_dim(contents: GGUFContents, config: dict[str, Any]) -> None:
    """Prefer attention.key_length; check the result against the q projection's shape."""
    key_length = contents.metadata.get(f"{contents.architecture}.attention.key_length")
    if key_length is not None:
        config["head_dim"] = int(key_length)
    num_heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // max(num_heads or 1, 1)
    q_rows = {t.name: t.shape[0] for t in contents.tensors}.get("blk.0.attn_q.weight")
    if q_rows is not None and num_heads and q_rows != num_heads * head_dim:
        raise ValueError(
            f"{contents.path!r}: blk.0.attn_q.weight has {q_rows} rows but "
            f"num_attention_heads={num_heads} x head_dim={head_dim} = {num_heads * head_dim}"
        )


def gguf_to_hf_name(name: str, arch: str = "llama") -> str:
    """Map a llama.cpp tensor name to its HF name; unknown names raise ValueError."""
    if arch == "gpt2":
        prefix, layer_names, global_names = "transformer.h", _GPT2_LAYER_NAMES, _GPT2_GLOBAL_NAMES
    else:
        prefix, global_names = "model.layers", _GLOBAL_NAMES
        layer_names = {**_LAYER_NAMES, **_ARCH_LAYER_NAMES.get(arch, {})}
    if match := _LAYER_RE.fullmatch(name):
        layer, kind, suffix = match.groups()
        if kind in layer_names:
            return f"{prefix}.{layer}.{layer_names[kind]}.{suffix}"
        if kind in _EXPERT_NAMES and suffix == "weight":  # stacked: read_gguf_tensors splits it
            return f"{prefix}.{layer}.mlp.experts.{_EXPERT_NAMES[kind]}.weight"
    elif (match := _GLOBAL_RE.fullmatch(name)) and match.group(1) in global_names:
        return f"{global_names[match.group(1)]}.{match.group(2)}"
    raise ValueError(f"unknown GGUF tensor name {name!r}: no HF name is known for it")


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation (halves -> interleaved pairs) of q/k."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    # [num_heads, head_dim // 2, 2, *rest] -> [num_heads, 2, head_dim // 2, *rest]
    split = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2)).reshape(weight.shape)  # [rows, *rest]


def dequantize_tensor(file_data: np.ndarray, info: GGUFTensorInfo) -> np.ndarray:
    """Float32 values of one tensor, shaped `info.shape`, copied out of the file's memory map."""
    raw = file_data[info.data_offset : info.data_offset + info.num_bytes]  # [num_bytes] uint8
    values = dequantize(np.asarray(raw), info.ggml_type)  # flat or block-rows, float32
    return np.array(values, dtype=np.float32).reshape(info.shape)  # [*info.shape]


def quantized_tensor(file_data: np.ndarray, info: GGUFTensorInfo) -> GGUFQuantizedTensor:
    """One quantized matrix's blocks, copied out of the file's memory map."""
    rows = int(np.prod(info.shape[:-1], dtype=np.int64))
    raw = file_data[info.data_offset : info.data_offset + info.num_bytes]  # [num_bytes] uint8
    data = torch.from_numpy(np.array(raw).reshape(rows, -1))  # [rows, row_bytes]
    return GGUFQuantizedTensor(info.ggml_type, data, (rows, info.shape[-1]))


def read_gguf_tensors(
    path: str, keep_quantized: bool = False
) -> Iterator[tuple[str, torch.Tensor | GGUFQuantizedTensor]]:
    """Yield (HF name, tensor) for every tensor in the file, q/k rows un-permuted: float32, or
    with `keep_quantized` each quantized matrix as a `GGUFQuantizedTensor` (its blocks)."""
    contents = read_gguf_metadata(path)
    arch = contents.architecture
    _model_type(contents)  # refuse unsupported architectures before any work
    weights = [t for t in contents.tensors if t.name != ROPE_FREQS]  # that one is config
    for info in weights:
        gguf_to_hf_name(info.name, arch)  # fail on an unknown name before dequantizing anything
    num_heads = int(contents.metadata.get(f"{arch}.attention.head_count", 0))
    num_kv_heads = int(contents.metadata.get(f"{arch}.attention.head_count_kv", num_heads))
    file_data = np.memmap(path, dtype=np.uint8, mode="r")  # [file_size]
    for info in weights:
        kept = keep_quantized and info.ggml_type not in FLOAT_TYPES and len(info.shape) in (2, 3)
        values = quantized_tensor(file_data, info).data.numpy() if kept else None
        if values is None:
            values = dequantize_tensor(file_data, info)
        # rows of blocks permute like rows of values: a block never spans two rows
        if arch in _PERMUTED_QK_ARCHS and ".attn_q." in info.name:
            values = unpermute_rotary_rows(values, num_heads)
        elif arch in _PERMUTED_QK_ARCHS and ".attn_k." in info.name:
            values = unpermute_rotary_rows(values, num_kv_heads)
        elif info.name.endswith(".ffn_gate_inp_shexp.weight"):
            values = values.reshape(1, -1)  # stored [hidden]; the gate is a [1, hidden] linear
        elif arch in _OFFSET_NORM_ARCHS and info.name.endswith("norm.weight"):
            values = values - 1.0  # back to the checkpoint's zero-centred weight
        elif arch == "gpt2" and info.name.endswith(_CONV1D_TENSORS) and not kept:
            values = np.ascontiguousarray(values.T)  # back to Conv1D's [in, out]
        tensor = torch.from_numpy(values)
        if len(info.shape) == 3:  # MoE experts stacked [num_experts, rows, cols]: one each
            yield from _per_expert(gguf_to_hf_name(info.name, arch), info, tensor, kept)
        elif kept:
            rows, cols = info.shape  # a kept tensor is a matrix
            packed = GGUFQuantizedTensor(info.ggml_type, tensor, (rows, cols))
            yield gguf_to_hf_name(info.name, arch), packed
        else:
            yield gguf_to_hf_name(info.name, arch), tensor


def _per_expert(
    name: str, info: GGUFTensorInfo, tensor: torch.Tensor, kept: bool
) -> Iterator[tuple[str, torch.Tensor | GGUFQuantizedTensor]]:
    """A stacked expert tensor (blocks [E * rows, row_bytes] or floats [E, rows, cols]) as each
    expert's matrix, named `...mlp.experts.{e}.{proj}.weight`."""
    match = _STACKED_EXPERTS_RE.fullmatch(name)
    if match is None:
        raise ValueError(f"GGUF tensor {info.name!r} has 3 dimensions but is no expert tensor")
    num_experts, rows, cols = info.shape
    prefix = f"model.layers.{match[1]}.mlp.experts"
    per_expert = tensor.reshape(num_experts, rows, -1)  # [E, rows, row_bytes or cols]
    for expert in range(num_experts):
        out_name = f"{prefix}.{expert}.{match[2]}.weight"
        if kept:
            yield out_name, GGUFQuantizedTensor(info.ggml_type, per_expert[expert], (rows, cols))
        else:
            yield out_name, per_expert[expert]


def tensor_types(path: str) -> dict[str, GGMLQuantizationType]:
    """GGUF tensor name -> its ggml type, from the tensor table alone."""
    return {t.name: t.ggml_type for t in read_gguf_metadata(path).tensors}
