"""Weights as integer or fp8 values times block scales (compressed-tensors, `quant_method: fp8`,
runtime `-q int8`/`-q fp8`): one method, configured by a quant_schemes.LinearScheme (weights and,
optionally, activations), so every checkpoint layout shares one loader and one product.

Layout on a rank (out = output features of the rank, in = its input features):
  weight        [out, in] int8 / fp8 e4m3, or `weight_packed` [out, in * bits / 32] int32
                (compressed-tensors pack-quantized: along the input, lowest bits first,
                offset-binary: stored = q + 2^(bits-1))
  <scale_name>  [out, column blocks] float32. The checkpoint's per-tensor scalars, per-channel
                [out, 1] and row-block [ceil(out / row_block), blocks] scales are expanded to
                one row per output feature by the loader, so shards and fused parts need no
                alignment with the blocks along the output.
  weight_zero_point  (asymmetric) packed like the values but along the OUTPUT
                (pack-quantized: [out * bits / 32, blocks] int32), or [out, blocks] int8
  input_scale   (static activations) per tensor, expanded like the weight scales; the product
                uses their maximum over a fused layer's parts (as vLLM does)
Products: int8 x int8 through torch._int_mm (exact); on CUDA weight-only int through the
Triton dequant GEMM, per-row fp8 through torch._scaled_mm, fp8 blocks through the Triton block
GEMM; everything else dequantize-then-matmul per tile of rows (ops.scaled_mm).
Invariant: `dequantize(layer)` is exactly what the checkpoint means, and every `apply` path is
tested against dequantize-then-matmul (with the activation quantized the same way).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

import paphos.kernels as triton_kernels
from paphos.ops import dequant_gemm, scaled_mm
from paphos.ops.dequant_gemm import GroupWeights
from paphos.ops.scaled_mm import ActivationQuant
from paphos.quant.base import register_weight_buffers, set_weight_attrs
from paphos.quant_schemes import LinearScheme


class ScaledLinearMethod:
    # a MoE layer builds one layer per routed expert with this method (layers.moe_experts)
    runs_experts = True

    def __init__(self, scheme: LinearScheme) -> None:
        self.weight = wq = scheme.weights
        if wq.packed and (wq.type != "int" or 32 % wq.bits):
            raise ValueError(f"packed {wq.type}{wq.bits} weights are not supported")
        self.dtype = torch.int8 if wq.type == "int" else scaled_mm.FP8_DTYPE
        acts = scheme.activations
        self.act = (
            None
            if acts is None
            else ActivationQuant(
                torch.int8 if acts.type == "int" else scaled_mm.FP8_DTYPE,
                acts.strategy,
                acts.group_size,
                acts.half_range,
                acts.static,
            )
        )

    # ---- parameters ------------------------------------------------------------------------

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
    ) -> None:
        wq = self.weight
        in_pp, out_pp = input_size_per_partition, sum(output_partition_sizes)
        sharded_in = in_pp != input_size
        if wq.quantize_at_load:  # dense now, quantized by process_weights_after_loading
            self._register(layer, "weight", torch.empty(out_pp, in_pp, dtype=params_dtype), 1)
            return
        block = wq.column_block
        whole_columns = block is None  # every rank holds the (one) column of scales
        if sharded_in and not whole_columns and in_pp % block:
            raise ValueError(
                f"a row-parallel shard of {in_pp} inputs is not whole scale blocks of {block} "
                "columns; use a tensor-parallel size that keeps them whole"
            )
        columns = 1 if block is None else -(-(input_size if whole_columns else in_pp) // block)
        if wq.packed:
            pack = 32 // wq.bits
            if in_pp % pack or out_pp % pack:
                raise ValueError(f"int{wq.bits} layer in={in_pp}, out={out_pp}: not whole packs")
            values = torch.empty(out_pp, in_pp // pack, dtype=torch.int32)
            self._register(layer, "weight_packed", values, 1)
            shape = nn.Parameter(torch.empty(2, dtype=torch.int64), requires_grad=False)
            loader = functools.partial(_check_weight_shape, layer)
            set_weight_attrs(
                shape, {"input_dim": None, "output_dim": None, "weight_loader": loader}
            )
            layer.register_parameter("weight_shape", shape)
        else:
            self._register(layer, "weight", torch.empty(out_pp, in_pp, dtype=self.dtype), 1)
        scale = torch.empty(out_pp, columns, dtype=torch.float32)  # [out, column blocks]
        self._register(layer, wq.scale_name, scale, None if whole_columns else 1, row_scales=True)
        if not wq.symmetric:
            if wq.packed:
                zero = torch.empty(out_pp // pack, columns, dtype=torch.int32)
                attrs = {"packed_dim": 0, "packed_factor": pack}
            else:
                zero, attrs = torch.empty(out_pp, columns, dtype=torch.int8), {}
            self._register(layer, "weight_zero_point", zero, None if whole_columns else 1, attrs)
        if self.act is not None and self.act.static:
            input_scale = torch.empty(out_pp, 1, dtype=torch.float32)
            self._register(layer, "input_scale", input_scale, None, row_scales=True)

    def _register(
        self,
        layer: nn.Module,
        name: str,
        data: torch.Tensor,
        input_dim: int | None,
        extra: dict | None = None,
        row_scales: bool = False,
    ) -> None:
        param = nn.Parameter(data, requires_grad=False)
        attrs = {"input_dim": input_dim, "output_dim": 0} | (extra or {})
        if row_scales:  # the checkpoint's scale rows expanded before the layer cuts its shard
            row_block = 1 if name == "input_scale" else self.weight.row_block
            attrs["weight_loader"] = functools.partial(_load_row_scales, layer, row_block)
        set_weight_attrs(param, attrs)
        layer.register_parameter(name, param)

    # ---- after loading ---------------------------------------------------------------------

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        wq = self.weight
        if wq.quantize_at_load:
            dense = layer.weight.data
            quantize = (
                scaled_mm.quantize_rows_int8
                if self.dtype == torch.int8
                else scaled_mm.quantize_rows_fp8
            )
            q, scale = quantize(dense)
            layer.weight = nn.Parameter(q, requires_grad=False)  # [out, in]
            layer.register_parameter(wq.scale_name, nn.Parameter(scale, requires_grad=False))
        values = layer.weight_packed if wq.packed else layer.weight
        in_pp = values.shape[1] * (32 // wq.bits if wq.packed else 1)
        if wq.column_block is None:
            columns = torch.zeros(in_pp, dtype=torch.long)
        else:
            columns = torch.arange(in_pp) // wq.column_block  # [in]: this rank's blocks
        layer.register_buffer(
            "scale_columns", columns.to(self.scales(layer).device), persistent=False
        )
        if not wq.symmetric:
            zero = layer.weight_zero_point.data
            if wq.packed:  # [out / pack, blocks] int32 -> [out, blocks]
                zero = _unpack(zero.t().contiguous(), wq.bits).t()
            layer.register_buffer("zero_values", zero.to(torch.int8).contiguous(), persistent=False)
        if self.act is not None and self.act.static:
            layer.register_buffer(
                "input_scale_max", layer.input_scale.data.amax(), persistent=False
            )
        layer.group_gemm = self._group_weights(layer, in_pp)
        if layer.group_gemm is not None:
            register_weight_buffers(layer, "gemm", layer.group_gemm.tensors())

    def _group_weights(self, layer: nn.Module, in_pp: int) -> GroupWeights | None:
        """On CUDA, weight-only int weights in the Triton dequant GEMM's layout (4-bit: the
        checkpoint's own words; 8-bit packed words unpacked once, replacing them)."""
        wq = self.weight
        group = wq.column_block or in_pp
        scale = self.scales(layer).data  # [out, blocks]
        if (
            self.act is not None
            or wq.type != "int"
            or not scale.is_cuda
            or not dequant_gemm.cuda_gemm_available(group)
            or in_pp % group
        ):
            return None
        zero = getattr(layer, "zero_values", None)
        zero = None if zero is None else zero.float()
        if wq.packed and wq.bits == 4:
            return GroupWeights(layer.weight_packed.data, scale, group, 4, 8, zero)
        if wq.packed:  # int8 in words: unpacked once, the words freed
            q = _unpack(layer.weight_packed.data, 8)  # [out, in] int8
            layer.weight_packed.data = q.new_empty(0, dtype=torch.int32)
            return GroupWeights(q, scale, group, 8, 0, zero)
        return GroupWeights(layer.weight.data, scale, group, 8, 0, zero)

    # ---- product ---------------------------------------------------------------------------

    def scales(self, layer: nn.Module) -> torch.Tensor:
        return getattr(layer, self.weight.scale_name)

    def values(self, layer: nn.Module, start: int, stop: int) -> torch.Tensor:
        """Signed values of rows [start, stop): [rows, in] int8 (or fp8)."""
        if self.weight.packed:
            return _unpack(layer.weight_packed.data[start:stop], self.weight.bits)
        return layer.weight.data[start:stop]

    def dequantize_rows(self, layer: nn.Module, start: int, stop: int) -> torch.Tensor:
        """W rows [start, stop) in float32: [rows, in]."""
        zero = getattr(layer, "zero_values", None)
        return scaled_mm.dequantize_rows(
            self.values(layer, start, stop),
            self.scales(layer).data[start:stop],
            None if zero is None else zero[start:stop],
            layer.scale_columns,
        )

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """The whole weight [out, in] in float32 (the oracle of every product)."""
        return self.dequantize_rows(layer, 0, self.scales(layer).shape[0])

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [num_tokens, in] -> [num_tokens, out] in x's dtype."""
        static = getattr(layer, "input_scale_max", None)
        group_gemm = getattr(layer, "group_gemm", None)
        if group_gemm is not None:  # CUDA, weight-only int: the Triton dequant GEMM
            return dequant_gemm.linear(x, group_gemm, bias)
        if x.is_cuda and self._takes_fp8_product(layer):
            act = self.act
            return scaled_mm.fp8_linear(x, layer.weight, self.scales(layer), bias, act, static)
        if x.is_cuda and self._takes_fp8_block_product():
            act = self.act
            return scaled_mm.fp8_block_linear(x, layer.weight, self.scales(layer), bias, act)
        if self._takes_int8_product(layer):
            act = self.act
            return scaled_mm.int8_linear(x, layer.weight, self.scales(layer), bias, act, static)
        out_features = self.scales(layer).shape[0]
        rows = functools.partial(self.dequantize_rows, layer)
        return scaled_mm.reference_linear(x, rows, out_features, bias, self.act, static)

    def _takes_fp8_product(self, layer: nn.Module) -> bool:
        """torch._scaled_mm (row-wise scales): fp8 per-token or per-tensor activations against
        fp8 weights with one scale per row, on a GPU with fp8 tensor cores."""
        act = self.act
        return (
            act is not None
            and act.dtype == scaled_mm.FP8_DTYPE
            and act.strategy in ("token", "tensor")
            and self.dtype == scaled_mm.FP8_DTYPE
            and self.scales(layer).shape[1] == 1
            and scaled_mm.takes_scaled_mm(layer.weight)
        )

    def _takes_fp8_block_product(self) -> bool:
        """The Triton fp8 block GEMM: fp8 weights whose column blocks are the activations'
        groups (DeepSeek's 1x128 per-token groups against 128x128 blocks)."""
        act, wq = self.act, self.weight
        block = wq.column_block
        return (
            act is not None
            and act.dtype == scaled_mm.FP8_DTYPE
            and act.strategy == "group"
            and self.dtype == scaled_mm.FP8_DTYPE
            and block is not None
            and act.group_size == block
            and block >= 16
            and block & (block - 1) == 0
            and "fp8_block_gemm" in triton_kernels.CUDA_KERNELS
        )

    def _takes_int8_product(self, layer: nn.Module) -> bool:
        """int8 x int8 summed exactly: int8 per-token or per-tensor activations against
        symmetric unpacked int8 weights with one scale per row."""
        act, wq = self.act, self.weight
        return (
            act is not None
            and act.dtype == torch.int8
            and act.strategy in ("token", "tensor")
            and self.dtype == torch.int8
            and not wq.packed
            and wq.symmetric
            and self.scales(layer).shape[1] == 1
        )


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, words] int32 (lowest bits first, offset-binary) -> [rows, words * 32 / bits]
    signed values in int8."""
    pack = 32 // bits
    shifts = torch.arange(pack, dtype=torch.int32, device=packed.device) * bits  # [pack]
    values = (packed.unsqueeze(2) >> shifts) & ((1 << bits) - 1)  # [rows, words, pack]
    return (values - (1 << (bits - 1))).reshape(packed.shape[0], -1).to(torch.int8)


def _checkpoint_rows(layer: nn.Module, shard_id: object) -> int:
    """Output features of the checkpoint tensor a shard id names (the layer's whole output for
    none; a QKV part's or a merged part's width)."""
    if shard_id is None:
        return layer.output_size
    sizes = getattr(layer, "checkpoint_sizes", None)  # QKVParallelLinear: q/k/v widths
    return sizes[shard_id] if sizes is not None else layer.output_sizes[shard_id]


def _load_row_scales(
    layer: nn.Module,
    row_block: int,
    param: nn.Parameter,
    loaded: torch.Tensor,
    shard_id: object = None,
) -> None:
    """Expand a checkpoint scale (a scalar, [rows], [rows, blocks] or row blocks
    [ceil(rows / row_block), blocks]) to [rows, blocks], then let the layer cut its shard."""
    rows = _checkpoint_rows(layer, shard_id)
    if loaded.numel() == 1:  # per tensor
        loaded = loaded.reshape(1, 1).expand(rows, param.shape[1])
    else:
        loaded = loaded.reshape(loaded.shape[0], -1)  # [rows or row blocks, blocks]
        if row_block > 1:
            loaded = loaded.repeat_interleave(row_block, dim=0)[:rows]
        if loaded.shape[0] != rows:
            raise ValueError(
                f"{type(layer).__name__}: scale of {loaded.shape[0]} rows for a tensor of "
                f"{rows} output features (shard {shard_id!r})"
            )
    layer.weight_loader(param, loaded.contiguous(), shard_id)


def _check_weight_shape(
    layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None
) -> None:
    """compressed-tensors' weight_shape [out, in] must be the checkpoint tensor's."""
    want = (_checkpoint_rows(layer, shard_id), layer.input_size)
    if tuple(int(v) for v in loaded.reshape(-1)) != want:
        raise ValueError(
            f"{type(layer).__name__}: checkpoint weight_shape {loaded.tolist()} for a tensor of "
            f"shape {list(want)} (shard {shard_id!r})"
        )
    param.data.copy_(loaded.reshape(2))
