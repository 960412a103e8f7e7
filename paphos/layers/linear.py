"""Tensor-parallel linear layers: replicated, column-sharded (plain, merged, QKV) and row-sharded.

Invariant: each layer asks its `LinearMethod` for its weights and gives every parameter a
`weight_loader(param, loaded_weight, shard_id=None)` that takes the FULL checkpoint tensor and
copies in exactly this rank's shard. Column layers shard output features, row layers input features.
"""

from __future__ import annotations

import torch
from torch import nn

from paphos.layers.weight_utils import narrow_checked, param_shape, store_slice
from paphos.ops.registry import pick
from paphos.parallel import SINGLE_PROCESS, ParallelInfo, all_gather, all_reduce, divide
from paphos.quant import LinearMethod, UnquantizedLinearMethod, set_weight_attrs

QKV_SHARD_IDS = ("q", "k", "v")


class LinearBase(nn.Module):
    """Holds what every linear layer shares: sizes, dtype, linear method and parallel info."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        linear_method: LinearMethod | None,
        parallel: ParallelInfo,
        params_dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("output_size", output_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected a positive int")
        self.input_size = input_size
        self.output_size = output_size
        self.parallel = parallel
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.linear_method = linear_method or UnquantizedLinearMethod()

    def _create_weights(
        self, input_per_partition: int, output_partition_sizes: list[int], bias_size: int | None
    ) -> None:
        """Weights through the linear method, then the bias; every parameter gets the layer's
        `weight_loader` (defined by each concrete layer) unless the method gave it its own."""
        self.linear_method.create_weights(
            self,
            input_per_partition,
            output_partition_sizes,
            self.input_size,
            self.output_size,
            self.params_dtype,
        )
        if bias_size is None:
            self.register_parameter("bias", None)
        else:
            data = torch.empty(bias_size, dtype=self.params_dtype)  # [bias_size]
            bias = nn.Parameter(data, requires_grad=False)
            set_weight_attrs(bias, {"input_dim": None, "output_dim": 0})
            self.bias = bias
        for param in self.parameters(recurse=False):
            if not hasattr(param, "weight_loader"):
                set_weight_attrs(param, {"weight_loader": self.weight_loader})

    def _load_rank_slice(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, dim_attr: str
    ) -> None:
        """Copy this rank's slice of the full tensor along the parameter's `dim_attr` dimension
        (the whole tensor when the parameter has none, i.e. it is replicated)."""
        what = type(self).__name__
        dim = getattr(param, dim_attr, None)
        if dim is not None:
            size = param_shape(param)[dim]
            start = self.parallel.rank * size
            full = size * self.parallel.world_size
            loaded_weight = narrow_checked(loaded_weight, dim, start, size, full, what)
        store_slice(param, loaded_weight, dim, 0, what)

    def _reject_shard_id(self, shard_id: object) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no shards; got shard_id={shard_id!r}")

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}, "
            f"rank={self.parallel.rank}/{self.parallel.world_size}"
        )


class ReplicatedLinear(LinearBase):
    """Full weights on every rank; no communication."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        linear_method: LinearMethod | None = None,
        parallel: ParallelInfo = SINGLE_PROCESS,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_size, output_size, linear_method, parallel, params_dtype)
        self._create_weights(input_size, [output_size], output_size if bias else None)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        self._reject_shard_id(shard_id)
        store_slice(param, loaded_weight, None, 0, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x, self.bias)  # [num_tokens, output_size]


class ColumnParallelLinear(LinearBase):
    """Output features split over ranks; `gather_output` all-gathers them back to full width."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        gather_output: bool = False,
        linear_method: LinearMethod | None = None,
        parallel: ParallelInfo = SINGLE_PROCESS,
        params_dtype: torch.dtype | None = None,
        output_partition_sizes: list[int] | None = None,
    ) -> None:
        super().__init__(input_size, output_size, linear_method, parallel, params_dtype)
        self.gather_output = gather_output
        self.output_size_per_partition = divide(output_size, parallel.world_size, "output_size")
        partition_sizes = output_partition_sizes or [self.output_size_per_partition]
        bias_size = self.output_size_per_partition if bias else None
        self._create_weights(input_size, partition_sizes, bias_size)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        self._reject_shard_id(shard_id)
        self._load_rank_slice(param, loaded_weight, "output_dim")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear_method.apply(self, x, self.bias)  # [num_tokens, output_per_partition]
        if self.gather_output:
            out = all_gather(out, self.parallel, dim=-1)  # [num_tokens, output_size]
        return out


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column layers fused along the output (gate+up); shard_id is the index of the part.

    Each rank holds [part0_shard | part1_shard | ...], so `silu_and_mul` works on the local output.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        linear_method: LinearMethod | None = None,
        parallel: ParallelInfo = SINGLE_PROCESS,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        if not output_sizes or any(not isinstance(s, int) or s < 1 for s in output_sizes):
            raise ValueError(f"output_sizes={output_sizes!r} is invalid: expected positive ints")
        ws = parallel.world_size
        self.output_sizes = list(output_sizes)
        partition_sizes = [divide(s, ws, f"output_sizes[{i}]") for i, s in enumerate(output_sizes)]
        super().__init__(
            input_size,
            sum(output_sizes),
            bias=bias,
            linear_method=linear_method,
            parallel=parallel,
            params_dtype=params_dtype,
            output_partition_sizes=partition_sizes,
        )

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        dim = getattr(param, "output_dim", None)
        if shard_id is None:  # a checkpoint that stores the parts already fused
            if dim is None:
                return store_slice(param, loaded_weight, None, 0, type(self).__name__)
            total = self.output_size
            full = narrow_checked(loaded_weight, dim, 0, total, total, "fused merged weight")
            for index, part in enumerate(full.split(self.output_sizes, dim=dim)):
                self.weight_loader(param, part, index)
            return None
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            num_parts = len(self.output_sizes)
            raise ValueError(
                f"shard_id={shard_id!r} is invalid: expected an index in [0, {num_parts})"
            )
        ws = self.parallel.world_size
        offset = sum(self.output_sizes[:shard_id]) // ws
        size = self.output_sizes[shard_id] // ws
        self._load_part(param, loaded_weight, dim, offset, size, self.parallel.rank, shard_id)
        return None

    def _load_part(
        self,
        param: nn.Parameter,
        loaded: torch.Tensor,
        dim: int | None,
        offset: int,
        size: int,
        source_index: int,
        shard_id: object,
    ) -> None:
        """Copy shard `source_index` (width `size`) of `loaded` into param rows [offset, +size)."""
        what = f"{type(self).__name__} shard {shard_id!r}"
        if dim is None:  # a per-tensor quantity, identical for every part
            return store_slice(param, loaded, None, 0, what)
        expected = self._part_full_size(shard_id)
        if getattr(param, "packed_dim", None) == dim:  # several features per stored element
            factor = param.packed_factor
            offset, size, expected = offset // factor, size // factor, expected // factor
        src = narrow_checked(loaded, dim, source_index * size, size, expected, what)
        store_slice(param, src, dim, offset, what)
        return None

    def _part_full_size(self, shard_id: object) -> int:
        return self.output_sizes[shard_id]  # type: ignore[index]

    def forward_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu_and_mul(self(x)) for a [gate | up] layer of two equal parts (an MLP's gate_up):
        [num_tokens, input_size] -> [num_tokens, part size per rank]. One kernel where the
        linear method has `apply_silu_and_mul` (the product's output is never stored)."""
        if len(self.output_sizes) != 2 or self.output_sizes[0] != self.output_sizes[1]:
            raise ValueError(
                f"forward_silu_and_mul needs two equal parts [gate | up]; this layer has "
                f"{self.output_sizes}"
            )
        fused = getattr(self.linear_method, "apply_silu_and_mul", None)
        if fused is None:
            return pick("silu_and_mul", x.device.type)(self(x))
        return fused(self, x, self.bias)  # [num_tokens, output_size_per_partition // 2]


class QKVParallelLinear(MergedColumnParallelLinear):
    """Query, key and value projections fused; heads split over ranks (shard ids "q", "k", "v").

    With fewer kv heads than ranks, each rank holds one kv head and ranks r with the same
    r // (world_size // total_num_kv_heads) hold the same one, so each query head keeps its kv head.
    """

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = False,
        linear_method: LinearMethod | None = None,
        parallel: ParallelInfo = SINGLE_PROCESS,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        for name, value in (
            ("head_size", head_size),
            ("total_num_heads", total_num_heads),
            ("total_num_kv_heads", total_num_kv_heads),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected a positive int")
        ws = parallel.world_size
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = divide(total_num_heads, ws, "total_num_heads")
        if ws % total_num_kv_heads != 0 and total_num_kv_heads % ws != 0:
            raise ValueError(
                f"total_num_kv_heads={total_num_kv_heads} is invalid at world size {ws}: "
                "one of them must divide the other"
            )
        # Fewer kv heads than ranks: one kv head per rank, each held by several ranks.
        self.num_kv_heads = max(1, total_num_kv_heads // ws)
        self.num_kv_head_replicas = max(1, ws // total_num_kv_heads)
        # Full (checkpoint) widths; the kv parts are replicated up to world size where needed.
        q_size, kv_size = total_num_heads * head_size, total_num_kv_heads * head_size
        self.checkpoint_sizes = {"q": q_size, "k": kv_size, "v": kv_size}
        kv_rows = self.num_kv_heads * head_size * ws
        super().__init__(
            hidden_size, [q_size, kv_rows, kv_rows], bias, linear_method, parallel, params_dtype
        )

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        dim = getattr(param, "output_dim", None)
        if shard_id is None:  # a checkpoint with a fused qkv tensor
            if dim is None:
                return store_slice(param, loaded_weight, None, 0, type(self).__name__)
            sizes = [self.checkpoint_sizes[s] for s in QKV_SHARD_IDS]
            full = narrow_checked(loaded_weight, dim, 0, sum(sizes), sum(sizes), "fused qkv")
            for sid, part in zip(QKV_SHARD_IDS, full.split(sizes, dim=dim), strict=True):
                self.weight_loader(param, part, sid)
            return None
        if shard_id not in QKV_SHARD_IDS:
            raise ValueError(f"shard_id={shard_id!r} is invalid: expected one of {QKV_SHARD_IDS}")
        q_rows = self.num_heads * self.head_size
        kv_rows = self.num_kv_heads * self.head_size
        rank = self.parallel.rank
        if shard_id == "q":
            offset, size, source_index = 0, q_rows, rank
        else:
            offset = q_rows if shard_id == "k" else q_rows + kv_rows
            size, source_index = kv_rows, rank // self.num_kv_head_replicas
        self._load_part(param, loaded_weight, dim, offset, size, source_index, shard_id)
        return None

    def _part_full_size(self, shard_id: object) -> int:
        return self.checkpoint_sizes[shard_id]  # type: ignore[index]


class RowParallelLinear(LinearBase):
    """Input features split over ranks; partial outputs summed by an all-reduce, bias added once."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        input_is_parallel: bool = True,
        reduce_results: bool = True,
        linear_method: LinearMethod | None = None,
        parallel: ParallelInfo = SINGLE_PROCESS,
        params_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(input_size, output_size, linear_method, parallel, params_dtype)
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        self.input_size_per_partition = divide(input_size, parallel.world_size, "input_size")
        self._create_weights(
            self.input_size_per_partition, [output_size], output_size if bias else None
        )

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        self._reject_shard_id(shard_id)
        self._load_rank_slice(param, loaded_weight, "input_dim")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            size = self.input_size_per_partition
            x = x.narrow(-1, self.parallel.rank * size, size)  # [num_tokens, input_per_partition]
        # Only rank 0 adds the bias, so the sum over ranks (here or by the caller) has it once.
        bias = self.bias if self.parallel.rank == 0 else None
        out = self.linear_method.apply(self, x, bias)  # [num_tokens, output_size] (partial sum)
        if self.reduce_results:
            out = all_reduce(out, self.parallel)
        return out
