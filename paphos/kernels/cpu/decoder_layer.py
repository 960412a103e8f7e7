"""Loader and Python entry of the one-call decoder layer in decoder_layer.c: a stack of Llama-style
layers run for pure-decode batches of 1..MAX_TOKENS tokens, one C call per layer.

Invariant: a `DecoderStack` holds every tensor whose address its C structs hold (weights, fp32
biases, buffers), so no address goes stale; its outputs are views of its own buffers, valid until
its next `run`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from paphos.gguf_file import GGUFQuantizedTensor
from paphos.kernels.cpu import attention, gguf_matvec, matvec, native, norm_rope

SOURCE = Path(__file__).with_name("decoder_layer.c")
MAX_TOKENS = matvec.MAX_ROWS  # decoder_layer.c's MAX_TOKENS: 4
DTYPES = (torch.bfloat16, torch.float32)
_ERRORS = {
    -1: "size (tokens, heads, head_size, hidden, intermediate, cache or rotary table)",
    -2: "num_threads",
    -3: "pointer",
    -4: "workspace (smaller than the layer needs)",
    -5: "query_start_loc",
    -6: "query_start_loc/seq_lens (more query tokens than context)",
    -7: "seq_lens (context longer than its block table row)",
    -8: "block_tables (block id outside the cache)",
    -9: "query_start_loc (not one token per sequence)",
    -10: "slot_mapping (slot outside the cache)",
    -11: "positions (outside the rotary table)",
}

_ptr, _i64 = ctypes.c_void_p, ctypes.c_int64
Weight = torch.Tensor | GGUFQuantizedTensor  # dense [out, in], or its GGUF blocks


class LayerSpec(ctypes.Structure):
    """decoder_layer.c's LayerSpec: one layer's constants."""

    _fields_ = [
        *((name, _ptr) for name in ("input_norm", "post_norm", "qkv", "o", "gate_up", "down")),
        *((name, _ptr) for name in ("qkv_bias", "o_bias", "gate_up_bias", "down_bias")),
        ("cos_sin", _ptr),
        *((name, _i64) for name in ("cos_sin_bf16", "max_position", "is_neox", "hidden")),
        *((name, _i64) for name in ("num_heads", "num_kv_heads", "head_size", "intermediate")),
        ("is_bf16", _i64),
        *((name, ctypes.c_float) for name in ("input_eps", "post_eps", "scale", "unused")),
        *((name, _i64) for name in ("qkv_type", "o_type", "gate_up_type", "down_type")),
        ("gguf_isa", _i64),
    ]


class DecodeStep(ctypes.Structure):
    """decoder_layer.c's DecodeStep: this step's batch, buffers and workspace."""

    _fields_ = [
        ("num_tokens", _i64),
        *((name, _ptr) for name in ("positions", "slot_mapping", "query_start_loc", "seq_lens")),
        ("block_tables", _ptr),
        *((name, _i64) for name in ("table_stride", "max_blocks", "num_blocks", "block_size")),
        ("num_threads", _i64),
        *((name, _ptr) for name in ("hidden", "residual", "workspace")),
        ("workspace_bytes", _i64),
        ("bad_seq", _i64),
    ]


@dataclass(frozen=True)
class DecoderLayerWeights:
    """One pre-norm layer: RMSNorm -> qkv -> rotary -> paged attention -> o -> add + RMSNorm ->
    gate_up -> silu(gate) * up -> down. Weights are [out, in]: dense in the norms' dtype, or GGUF
    blocks of one type each (as GGUFLinearMethod multiplies them); biases [out] or None."""

    input_norm: torch.Tensor
    input_eps: float
    qkv: Weight
    qkv_bias: torch.Tensor | None
    o: Weight
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    post_eps: float
    gate_up: Weight
    gate_up_bias: torch.Tensor | None
    down: Weight
    down_bias: torch.Tensor | None
    cos_sin_cache: torch.Tensor  # [max_position, head_size]: cos | sin
    is_neox: bool
    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: float


find_compiler = native.find_compiler  # module attributes, so tests can replace them


def library_path(compiler: str, source: bytes, level: str) -> Path:
    return native.library_path("decoder_layer", compiler, source, level)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.paphos_decoder_layer.argtypes = [_ptr, _ptr, _ptr, _ptr, ctypes.c_int]
    lib.paphos_decoder_layer.restype = ctypes.c_int
    lib.paphos_decoder_workspace_bytes.argtypes = [_ptr, _i64]
    lib.paphos_decoder_workspace_bytes.restype = _i64
    return lib


@cache
def load_library(level: str | None = None) -> ctypes.CDLL | None:
    """The kernel library built for ISA `level` (default: this process's), or None (logged once)
    where it cannot run here."""
    return native.load_library("decoder_layer", SOURCE, find_compiler(), library_path, bind, level)


def unsupported_reason(layer: DecoderLayerWeights) -> str | None:
    """Why the kernel cannot run this layer (None when it can)."""
    dtype, hidden = layer.input_norm.dtype, layer.input_norm.shape[-1]
    weights = [layer.qkv, layer.o, layer.gate_up, layer.down]
    dense = [
        layer.input_norm,
        layer.post_norm,
        *(w for w in weights if isinstance(w, torch.Tensor)),
    ]
    if dtype not in DTYPES or any(t.dtype != dtype for t in dense):
        found = sorted({str(t.dtype).removeprefix("torch.") for t in dense})
        return f"its weights are {'/'.join(found)}; the kernel runs bfloat16 or float32 weights"
    tensors = [t.data if isinstance(t, GGUFQuantizedTensor) else t for t in [*dense, *weights]]
    if not all(t.is_cpu and t.is_contiguous() for t in tensors):
        return "weights not contiguous CPU tensors"
    q, kv = layer.num_heads * layer.head_size, layer.num_kv_heads * layer.head_size
    inter = layer.down.shape[-1]
    shapes = {
        "qkv": (layer.qkv.shape, (q + 2 * kv, hidden)),
        "o": (layer.o.shape, (hidden, q)),
        "gate_up": (layer.gate_up.shape, (2 * inter, hidden)),
        "down": (layer.down.shape, (hidden, inter)),
        "norms": (layer.input_norm.shape + layer.post_norm.shape, (hidden, hidden)),
        "cos_sin_cache": (layer.cos_sin_cache.shape[1:], (layer.head_size,)),
    }
    for name, (got, want) in shapes.items():
        if tuple(got) != want:
            return f"{name} shape {tuple(got)} should be {want}"
    if layer.head_size % 16 or not 16 <= layer.head_size <= attention.MAX_HEAD:
        return f"head_size {layer.head_size} is not a multiple of 16 in [16, {attention.MAX_HEAD}]"
    if hidden > norm_rope.MAX_WIDTH or layer.num_heads % layer.num_kv_heads:
        return f"hidden {hidden} or heads {layer.num_heads}/{layer.num_kv_heads} not supported"
    table = layer.cos_sin_cache
    if table.dtype not in (torch.float32, torch.bfloat16) or not table.is_cpu:
        return f"rotary table in {table.dtype} on {table.device}"
    return None


def _spec(layer: DecoderLayerWeights, keep: list[torch.Tensor], gguf_isa: int) -> LayerSpec:
    """The layer's C struct; tensors it points at (contiguous tables, fp32 biases) go to `keep`."""
    table = layer.cos_sin_cache.contiguous()  # [max_position, head_size]
    biases = [None if b is None else b.float().contiguous() for b in _biases(layer)]  # [out] each
    keep += [table, *(b for b in biases if b is not None)]
    weights = (layer.qkv, layer.o, layer.gate_up, layer.down)
    spec = LayerSpec(
        *(t.data_ptr() for t in (layer.input_norm, layer.post_norm)),
        *(_storage(w).data_ptr() for w in weights),
        *(None if b is None else b.data_ptr() for b in biases),
        table.data_ptr(),
        *(table.dtype == torch.bfloat16, table.shape[0], layer.is_neox, layer.input_norm.shape[0]),
        *(layer.num_heads, layer.num_kv_heads, layer.head_size, layer.down.shape[1]),
        layer.input_norm.dtype == torch.bfloat16,
        *(layer.input_eps, layer.post_eps, layer.scale, 0.0),
        *(int(w.ggml_type) if isinstance(w, GGUFQuantizedTensor) else -1 for w in weights),
        gguf_isa,
    )
    return spec


def _storage(weight: Weight) -> torch.Tensor:
    """What the kernel reads: the dense rows, or the [out, row_bytes] uint8 blocks."""
    return weight.data if isinstance(weight, GGUFQuantizedTensor) else weight


def _biases(layer: DecoderLayerWeights) -> tuple[torch.Tensor | None, ...]:
    return (layer.qkv_bias, layer.o_bias, layer.gate_up_bias, layer.down_bias)


def _as_int64(index: torch.Tensor) -> torch.Tensor:
    if index.dtype == torch.int64 and index.stride(-1) == 1:
        return index
    return index.to(torch.int64).contiguous()  # same shape, int64 rows of unit stride


class DecoderStack:
    """Layers run by the kernel; `run` goes through all of them for one step's tokens."""

    def __init__(self, lib: ctypes.CDLL, layers: Sequence[DecoderLayerWeights]) -> None:
        if not layers:
            raise ValueError("a DecoderStack needs at least one layer")
        for index, layer in enumerate(layers):
            reason = unsupported_reason(layer)
            if reason is not None:
                raise ValueError(f"layer {index} cannot run in the fused CPU kernel: {reason}")
        self._lib = lib
        self._layers = list(layers)  # keeps the weights the structs point at alive
        self._keep: list[torch.Tensor] = []
        gguf_isa = gguf_matvec.best_isa(lib)
        self._specs = [_spec(layer, self._keep, gguf_isa) for layer in layers]
        self._spec_addresses = [ctypes.addressof(spec) for spec in self._specs]
        first = layers[0]
        self.dtype = first.input_norm.dtype
        self.hidden_size = first.input_norm.shape[0]
        self.num_kv_heads, self.head_size = first.num_kv_heads, first.head_size
        shape = (MAX_TOKENS, self.hidden_size)
        self._hidden = torch.empty(shape, dtype=self.dtype)  # [MAX_TOKENS, hidden]
        self._residual = torch.empty(shape, dtype=self.dtype)  # [MAX_TOKENS, hidden]
        # [n, hidden] views of the buffers, one pair per batch size n
        self._views = [(self._hidden[:n], self._residual[:n]) for n in range(MAX_TOKENS + 1)]
        self._step = DecodeStep()
        self._step.hidden, self._step.residual = self._hidden.data_ptr(), self._residual.data_ptr()
        self._step_address = ctypes.addressof(self._step)
        self._workspace = torch.empty(0, dtype=torch.uint8)  # [0] bytes: grown by _reserve
        self._threads = 0
        self._step_tensors: tuple[torch.Tensor, ...] = ()
        self._checked_caches: Sequence[torch.Tensor] | None = None

    def _reserve(self, threads: int) -> None:
        """Workspace for `threads` threads (sized by the C layout, the largest of all layers)."""
        sizes = (self._lib.paphos_decoder_workspace_bytes(a, threads) for a in self._spec_addresses)
        size = max(sizes)
        self._workspace = torch.empty(size, dtype=torch.uint8)  # [bytes]
        self._step.workspace, self._step.workspace_bytes = self._workspace.data_ptr(), size
        self._threads = threads

    def check_caches(self, kv_caches: Sequence[torch.Tensor]) -> bool:
        """Whether every layer's cache is [2, blocks, block_size, kv heads, head_size] of one
        shape, contiguous, in the weights' dtype (checked once per list object)."""
        if kv_caches is self._checked_caches:
            return True
        first = kv_caches[0] if len(kv_caches) == len(self._specs) else None
        if first is None or first.dim() != 5 or first.shape[0] != 2:
            return False
        if tuple(first.shape[3:]) != (self.num_kv_heads, self.head_size):
            return False
        for cache_tensor in kv_caches:
            if cache_tensor.shape != first.shape or cache_tensor.dtype != self.dtype:
                return False
            if not (cache_tensor.is_cpu and cache_tensor.is_contiguous()):
                return False
        self._checked_caches = kv_caches
        return True

    def run(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        kv_caches: Sequence[torch.Tensor],
        slot_mapping: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All layers over hidden_states [n <= MAX_TOKENS, hidden] (one decode token of each of n
        sequences); returns (hidden, residual) [n, hidden] as the last layer's forward does."""
        num_tokens = hidden_states.shape[0]
        if not (0 < num_tokens <= MAX_TOKENS and self.check_caches(kv_caches)):
            raise ValueError(
                f"DecoderStack.run takes 1..{MAX_TOKENS} tokens and per-layer caches "
                f"[2, blocks, block_size, {self.num_kv_heads}, {self.head_size}] in {self.dtype}"
            )
        if hidden_states.dtype != self.dtype or hidden_states.shape[1] != self.hidden_size:
            raise ValueError(
                f"hidden_states {tuple(hidden_states.shape)} {hidden_states.dtype} should be "
                f"[{num_tokens}, {self.hidden_size}] {self.dtype}"
            )
        x = hidden_states.contiguous()  # [num_tokens, hidden]
        self._begin(num_tokens, positions, kv_caches[0], slot_mapping, query_start_loc, seq_lens)
        tables = _as_int64(block_tables)  # [num_seqs, max_blocks], rows of unit stride
        step = self._step
        step.block_tables, step.table_stride, step.max_blocks = (
            tables.data_ptr(),
            tables.stride(0),
            tables.shape[1],
        )
        call, step_address = self._lib.paphos_decoder_layer, self._step_address
        x_address, add, hidden_address = x.data_ptr(), 0, step.hidden
        for spec_address, cache_tensor in zip(self._spec_addresses, kv_caches):
            code = call(spec_address, step_address, cache_tensor.data_ptr(), x_address, add)
            if code != 0:
                self._raise(code)
            x_address, add = hidden_address, 1
        return self._views[num_tokens]

    def _begin(
        self,
        num_tokens: int,
        positions: torch.Tensor,
        first_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
    ) -> None:
        """Fill the step struct (int64 index arrays kept alive until the next step)."""
        threads = torch.get_num_threads()
        if threads > self._threads:
            self._reserve(threads)
        index = [_as_int64(t).contiguous() for t in (positions, slot_mapping, query_start_loc)]
        index.append(_as_int64(seq_lens).contiguous())
        for tensor, size in zip(index, (num_tokens, num_tokens, num_tokens + 1, num_tokens)):
            if tuple(tensor.shape) != (size,):
                raise ValueError(f"index tensor of shape {tuple(tensor.shape)} should be ({size},)")
        self._step_tensors = tuple(index)
        step = self._step
        step.num_tokens, step.num_threads = num_tokens, threads
        step.positions, step.slot_mapping = index[0].data_ptr(), index[1].data_ptr()
        step.query_start_loc, step.seq_lens = index[2].data_ptr(), index[3].data_ptr()
        step.num_blocks, step.block_size = first_cache.shape[1], first_cache.shape[2]

    def _raise(self, code: int) -> None:
        seq = self._step.bad_seq
        where = f" at sequence {seq}" if seq >= 0 else ""
        if code in (-10, -11):  # name the value: the slot or the position
            where += f" (value {int(self._step_tensors[1 if code == -10 else 0][seq])})"
        raise ValueError(f"paphos_decoder_layer rejected its {_ERRORS.get(code, code)}{where}")
