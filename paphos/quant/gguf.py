"""GGUF weights kept as stored: each linear layer holds its rows as the file's blocks.

Invariant: a layer's output rows are covered, in order, by parts; each part is one ggml type
(llama.cpp's mixes put several types in one file, and a fused qkv may hold q/k in Q4_K and v in
Q6_K) stored as `[rows, row_bytes]` uint8, or dense rows for float tensors. With fp32 activations
`apply` equals dequantize-then-matmul (`reference_apply`): up to 16 rows multiply the blocks in C,
more rows multiply tiles dequantized per call. With PAPHOS_GGUF_Q8_ACTIVATIONS=1 (read once),
batches of more than 4 rows of a 16-bit model quantize their activations to 8 bits per 32
elements, as llama.cpp does, and take integer dot products with the blocks (`reference_apply_q8`
is their oracle): ~1.4x faster batches, but greedy text leaves the fp32 model sooner (on workload
W 21 of 64 tokens equal on average, against 32 for dense bf16; the default model's chat answer
changed), so it is off by default. No dense copy is kept: memory stays the file's.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize
from torch import nn

from paphos.gguf_file import GGUFQuantizedTensor
from paphos.kernels.cpu import gguf_matvec
from paphos.ops import dense
from paphos.quant import gguf_gemm
from paphos.quant.base import set_weight_attrs

T = GGMLQuantizationType
KEPT_TYPES = (
    *(T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0),
    *(T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS),
)
# Types the gguf package quantizes (runtime quantization of float checkpoints).
RUNTIME_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
# fp32 bytes of one dequantized tile of the batched path: large enough that the Python loop over
# tiles (~30 us each) stays small beside the GEMMs (~150 tiles per SmolLM2 step), in L2/L3
TILE_BYTES = 4 << 20
# Activation (or model) dtypes whose CPU products quantize activations to 8 bits (fp32 models
# stay exact: they are held to the fp32 reference)
Q8_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)
# Opt-in: 8-bit activations for the batches of 16-bit models (llama.cpp's numerics; see above)
Q8_ACTIVATIONS_ENV = "PAPHOS_GGUF_Q8_ACTIVATIONS"


@functools.cache
def q8_activations() -> bool:
    return os.environ.get(Q8_ACTIVATIONS_ENV, "0") == "1"


# Batches up to this many rows keep fp32 activations (the block products): the fused CPU decode
# layer (1-4 tokens) multiplies the same blocks so, and stays bitwise equal to these layers
Q8_MIN_ROWS = 4


@dataclass(frozen=True)
class GGUFPart:
    """Output rows [row_start, row_start + rows) of a layer, in buffer `name`."""

    row_start: int
    rows: int
    ggml_type: GGMLQuantizationType | None  # None: dense rows in the layer's dtype
    name: str


class GGUFLinearMethod:
    """Linear (and embedding) weights from a GGUF file, kept in their blocks.

    Holds one scratch tile per dtype for the batched path, reused by every call (a fresh tile
    tensor per call would be a fresh mapping: its page faults cost more than the dequantization).
    """

    # a MoE layer builds one layer per routed expert with this method (layers.moe_experts)
    runs_experts = True

    def __init__(
        self, quantize_to: GGMLQuantizationType | None = None, group_gemm: bool = False
    ) -> None:
        """quantize_to: dense matrices loaded from a float checkpoint become blocks of this type
        after loading (runtime `-q q8_0` etc.), where their rows are whole blocks. group_gemm:
        the parts are repacked for the dequant GEMM (quant/gguf_gemm.py: CUDA)."""
        self.group_gemm = group_gemm
        if quantize_to is not None and quantize_to not in RUNTIME_TYPES:
            raise ValueError(f"quantize_to={quantize_to!r}: expected one of {RUNTIME_TYPES}")
        self.quantize_to = quantize_to
        self._tiles: dict[torch.dtype, torch.Tensor] = {}  # dtype -> [tile elements]

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        # A placeholder the loader finds by name; the shards it is given land in layer.gguf_slices.
        weight = nn.Parameter(torch.empty(0, dtype=torch.uint8), requires_grad=False)  # [0]
        shape = (sum(output_partition_sizes), input_size_per_partition)
        store = functools.partial(_store_slice, layer)
        attrs = {"input_dim": 1, "output_dim": 0, "logical_shape": shape, "store_slice": store}
        set_weight_attrs(weight, attrs)
        layer.register_parameter("weight", weight)
        layer.gguf_shape = shape
        layer.gguf_dtype = params_dtype
        layer.gguf_slices = []
        layer.gguf_parts = ()

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Order the loaded slices by row, pad missing trailing rows (vocabulary padding) with
        zero blocks, merge neighbours of one type and register each part as a buffer."""
        slices = sorted(layer.gguf_slices, key=lambda s: s[0])
        layer.gguf_slices = []
        if not slices:
            if getattr(layer, "tied_embedding", None) is not None:
                return  # a tied LM head: the embedding holds the blocks
            raise ValueError(
                f"{type(layer).__name__}: no weights were loaded into its GGUF blocks (quantized "
                "weights need a checkpoint, not load_format='dummy')"
            )
        total_rows, in_features = layer.gguf_shape
        row = 0
        merged: list[tuple[int, torch.Tensor | GGUFQuantizedTensor]] = []
        for start, src in slices:
            if start != row:
                raise ValueError(f"GGUF weight rows [{row}, {start}) were never loaded")
            row += src.shape[0]
            if merged and _same_kind(merged[-1][1], src):
                merged[-1] = (merged[-1][0], _cat(merged[-1][1], src))
            else:
                merged.append((start, src))
        if row < total_rows:  # zero bytes are zero values in every ggml type
            merged[-1] = (
                merged[-1][0],
                _cat(merged[-1][1], _zeros_like(merged[-1][1], total_rows - row)),
            )
        if self.quantize_to is not None:
            merged = [(start, self._quantized(src)) for start, src in merged]
        parts = []
        for index, (start, src) in enumerate(merged):
            name = f"gguf_part{index}"
            if isinstance(src, GGUFQuantizedTensor):
                layer.register_buffer(name, src.data.contiguous(), persistent=False)
                parts.append(GGUFPart(start, src.shape[0], src.ggml_type, name))
            else:
                layer.register_buffer(name, src.contiguous(), persistent=False)
                parts.append(GGUFPart(start, src.shape[0], None, name))
        layer.gguf_parts = tuple(parts)
        layer.gguf_group = None
        if self.group_gemm:
            device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
            dense_of = functools.partial(dequantized_part, layer)
            layer.gguf_group = gguf_gemm.repack(layer, device, dense_of)

    def _quantized(
        self, src: torch.Tensor | GGUFQuantizedTensor
    ) -> torch.Tensor | GGUFQuantizedTensor:
        """Dense rows as blocks of `quantize_to` (by the gguf package), where rows are whole
        blocks; anything else unchanged."""
        ggml_type = self.quantize_to
        if isinstance(src, GGUFQuantizedTensor) or ggml_type is None:
            return src
        if src.shape[1] % GGML_QUANT_SIZES[ggml_type][0]:
            return src
        blocks = quantize(src.float().numpy(), ggml_type)  # [rows, row_bytes] uint8
        return GGUFQuantizedTensor(ggml_type, torch.from_numpy(blocks), tuple(src.shape))

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [num_tokens, in] -> [num_tokens, out] in x's dtype (fp32 sums)."""
        if getattr(layer, "gguf_group", None) is not None:
            return gguf_gemm.apply(layer, x, bias)
        lib = gguf_matvec.load_library() if x.is_cpu else None
        if (
            lib is not None
            and q8_activations()
            and x.shape[0] > Q8_MIN_ROWS
            and (x.dtype in Q8_ACTIVATION_DTYPES or layer.gguf_dtype in Q8_ACTIVATION_DTYPES)
        ):  # a 16-bit model's layer (its LM head gets fp32 hidden states, for fp32 logits)
            return self._apply_q8(lib, layer, x, bias)
        x_fp32 = x.float().contiguous()  # [num_tokens, in]
        total_rows = layer.gguf_shape[0]
        out = torch.empty(x.shape[0], total_rows, dtype=torch.float32)  # [num_tokens, out]
        threads = torch.get_num_threads()
        for part in layer.gguf_parts:
            y = out if len(layer.gguf_parts) == 1 else out.narrow(1, part.row_start, part.rows)
            data = getattr(layer, part.name)
            if part.ggml_type is None:  # float rows (an F16/F32 tensor): the dense CPU policy
                x_dense = x_fp32 if data.dtype == torch.float32 else x.to(data.dtype)
                y.copy_(dense.linear(x_dense.contiguous(), data))
            elif lib is not None and x.shape[0] <= gguf_matvec.BLOCK_PRODUCT_MAX_ROWS:
                gguf_matvec.matvec_into(lib, part.ggml_type, x_fp32, data, y, threads)
            else:
                # bf16 activations multiply bf16 tiles where the CPU has bf16 GEMMs (AMX or
                # AVX512-BF16: ~10x its fp32 GEMM); else fp32 (exact dequantize-then-matmul)
                x_tile = (
                    x if x.dtype == torch.bfloat16 and dense.cpu_has_native_half_gemm() else x_fp32
                )
                self._tiled_product(lib, part.ggml_type, data, x_tile.contiguous(), y, threads)
        if bias is not None:
            out += bias.float()
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def _apply_q8(
        self, lib, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """16-bit activations or model: blocks times x quantized to 8 bits (`reference_apply_q8`);
        the output in x's dtype."""
        x_q8 = (x if x.dtype in (torch.bfloat16, torch.float32) else x.float()).contiguous()
        # bf16 out straight from the kernel (one rounding) unless a bias is added first
        out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 and bias is None else torch.float32
        out = torch.empty(x.shape[0], layer.gguf_shape[0], dtype=out_dtype)  # [tokens, out]
        threads = torch.get_num_threads()
        for part in layer.gguf_parts:
            y = out if len(layer.gguf_parts) == 1 else out.narrow(1, part.row_start, part.rows)
            data = getattr(layer, part.name)
            if part.ggml_type is None:  # float rows: the dense CPU policy
                y.copy_(dense.linear(x.to(data.dtype).contiguous(), data))
            else:
                gguf_matvec.gemm_q8_into(lib, part.ggml_type, x_q8, data, y, threads)
        if bias is not None:
            out += bias.float()
        return out.to(x.dtype)

    def _tiled_product(
        self, lib, ggml_type, data: torch.Tensor, x: torch.Tensor, y: torch.Tensor, threads: int
    ) -> None:
        """y [num_tokens, rows] = x [num_tokens, in] @ W.T, W dequantized (in x's dtype) one tile
        at a time into a reused buffer."""
        in_features = x.shape[1]
        tile_rows = max(16, TILE_BYTES // (4 * in_features))
        buffer = self._tiles.get(x.dtype)
        if lib is not None and (buffer is None or buffer.numel() < tile_rows * in_features):
            buffer = torch.empty(tile_rows * in_features, dtype=x.dtype)  # [tile elements]
            self._tiles[x.dtype] = buffer
        for start in range(0, data.shape[0], tile_rows):
            rows = min(tile_rows, data.shape[0] - start)
            part = data.narrow(0, start, rows)  # [rows, row_bytes]
            if lib is None or buffer is None:
                weight = _dequantize(None, ggml_type, part, in_features).to(x.dtype)  # [rows, in]
            else:
                tile = buffer[: rows * in_features].view(rows, in_features)
                weight = gguf_matvec.dequantize(lib, ggml_type, part, in_features, threads, tile)
            y.narrow(1, start, rows).copy_(x @ weight.T)  # [num_tokens, rows]

    def embedding(self, layer: nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the weight, dequantized: [*ids.shape] -> [*ids.shape, in] in `dtype`."""
        if getattr(layer, "gguf_group", None) is not None:
            return gguf_gemm.embedding(layer, ids, dtype)
        flat = ids.reshape(-1)  # [num_ids]
        in_features = layer.gguf_shape[1]
        out = torch.empty(flat.shape[0], in_features, dtype=dtype)  # [num_ids, in]
        lib = gguf_matvec.load_library()
        for part in layer.gguf_parts:
            local = flat - part.row_start
            inside = (local >= 0) & (local < part.rows)
            if not bool(inside.any()):
                continue
            rows = getattr(layer, part.name).index_select(0, local[inside])  # [n, row_bytes]
            out[inside] = _dequantize(lib, part.ggml_type, rows, in_features).to(dtype)
        return out.reshape(*ids.shape, in_features)


def reference_apply(
    layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The oracle: every part dequantized by the `gguf` package, then one fp32 matmul."""
    weight = torch.cat([dequantized_part(layer, part) for part in layer.gguf_parts])  # [out, in]
    out = x.float() @ weight.T  # [num_tokens, out]
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def quantize_activations_reference(x: torch.Tensor) -> torch.Tensor:
    """x [num_tokens, in] -> fp32 x quantized to 8 bits per 32-element block and back: d =
    max |x| / 127, q = round-half-even(x / d) (0 where d is 0), values q * d. The activations
    the 16-bit path of `GGUFLinearMethod.apply` multiplies."""
    blocks = x.float().reshape(x.shape[0], -1, 32)  # [num_tokens, in / 32, 32]
    d = blocks.abs().amax(-1, keepdim=True) / 127  # [num_tokens, in / 32, 1]
    q = torch.where(d == 0, torch.zeros_like(blocks), torch.round(blocks / d))
    return (q * d).reshape(x.shape)


def reference_apply_q8(
    layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The oracle of 16-bit activations: the blocks dequantized by the `gguf` package times the
    8-bit activations (`quantize_activations_reference`); float parts take x as it is."""
    pieces = []
    x_q8 = quantize_activations_reference(x)  # [num_tokens, in]
    for part in layer.gguf_parts:
        x_part = x.float() if part.ggml_type is None else x_q8
        pieces.append(x_part.double() @ dequantized_part(layer, part).double().T)
    out = torch.cat(pieces, dim=1)  # [num_tokens, out]
    if bias is not None:
        out += bias.double()
    return out.to(x.dtype)


def dequantized_part(layer: nn.Module, part: GGUFPart) -> torch.Tensor:
    data = getattr(layer, part.name)
    if part.ggml_type is None:
        return data.float()
    return GGUFQuantizedTensor(part.ggml_type, data, (part.rows, layer.gguf_shape[1])).dequantize()


def _store_slice(
    layer: nn.Module, src: torch.Tensor | GGUFQuantizedTensor, dim: int | None, offset: int
) -> None:
    """The layer's weight loader hands this rank's rows (or columns) here, in elements."""
    rows, cols = layer.gguf_shape
    if len(src.shape) != 2 or src.shape[1] != cols or (dim is None and src.shape[0] != rows):
        raise ValueError(
            f"GGUF weight slice of shape {tuple(src.shape)} does not fit {(rows, cols)}"
        )
    start = offset if dim == 0 else 0
    if isinstance(src, GGUFQuantizedTensor):
        if src.ggml_type not in KEPT_TYPES:
            raise ValueError(f"GGUF type {src.ggml_type.name} cannot be kept quantized")
        kept = GGUFQuantizedTensor(src.ggml_type, src.data.contiguous().clone(), tuple(src.shape))
        layer.gguf_slices.append((start, kept))
    else:
        layer.gguf_slices.append((start, src.to(layer.gguf_dtype).contiguous().clone()))


def _same_kind(
    a: torch.Tensor | GGUFQuantizedTensor, b: torch.Tensor | GGUFQuantizedTensor
) -> bool:
    return getattr(a, "ggml_type", None) == getattr(b, "ggml_type", None)


def _cat(a, b):
    if isinstance(a, GGUFQuantizedTensor):
        data = torch.cat([a.data, b.data])  # [rows_a + rows_b, row_bytes]
        return GGUFQuantizedTensor(a.ggml_type, data, (a.shape[0] + b.shape[0], a.shape[1]))
    return torch.cat([a, b])


def _zeros_like(src, rows: int):
    if isinstance(src, GGUFQuantizedTensor):
        data = torch.zeros(rows, src.data.shape[1], dtype=torch.uint8)  # [rows, row_bytes]
        return GGUFQuantizedTensor(src.ggml_type, data, (rows, src.shape[1]))
    return torch.zeros(rows, src.shape[1], dtype=src.dtype)


def _dequantize(lib, ggml_type, data: torch.Tensor, in_features: int) -> torch.Tensor:
    """float32 [rows, in] of a part's rows: the C kernel, or the gguf package where it did not
    load."""
    if ggml_type is None:
        return data.float()
    if lib is None:
        return GGUFQuantizedTensor(ggml_type, data, (data.shape[0], in_features)).dequantize()
    return gguf_matvec.dequantize(lib, ggml_type, data, in_features, torch.get_num_threads())
