"""Vocabulary-parallel embedding and LM head: rows of the vocabulary split evenly over ranks.

Padding rule: the vocabulary is padded up to a multiple of `padding_size * world_size` (default 64),
so every rank holds the same number of rows, a multiple of `padding_size`. Rank r owns ids
[r * rows_per_rank, (r + 1) * rows_per_rank); padding rows are zero and never reach the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paphos.layers.weight_utils import param_shape, store_slice
from paphos.ops import dense
from paphos.parallel import SINGLE_PROCESS, ParallelInfo, all_reduce, round_up
from paphos.quant import LinearMethod, set_weight_attrs

DEFAULT_VOCAB_PADDING = 64


class VocabParallelEmbedding(nn.Module):
    """Embedding lookup where each rank holds a slice of the vocabulary; the slices are summed."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        parallel: ParallelInfo = SINGLE_PROCESS,
        params_dtype: torch.dtype | None = None,
        padding_size: int = DEFAULT_VOCAB_PADDING,
        linear_method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_embeddings", num_embeddings),
            ("embedding_dim", embedding_dim),
            ("padding_size", padding_size),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected a positive int")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.parallel = parallel
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.num_embeddings_padded = round_up(num_embeddings, padding_size * parallel.world_size)
        self.rows_per_rank = self.num_embeddings_padded // parallel.world_size
        self.vocab_start = parallel.rank * self.rows_per_rank
        # Real (non-padding) rows of this rank: ids [vocab_start, vocab_start + num_real_rows).
        self.num_real_rows = max(0, min(self.rows_per_rank, num_embeddings - self.vocab_start))
        # Only methods that can look rows up (quantized ones) hold the weight; else it is dense.
        packed = linear_method is not None and hasattr(linear_method, "embedding")
        self.linear_method = linear_method if packed else None
        if self.linear_method is not None:
            self.linear_method.create_weights(
                self,
                embedding_dim,
                [self.rows_per_rank],
                embedding_dim,
                num_embeddings,
                self.params_dtype,
            )
        else:
            # [rows_per_rank, embedding_dim]
            data = torch.empty(self.rows_per_rank, embedding_dim, dtype=self.params_dtype)
            self.weight = nn.Parameter(data, requires_grad=False)
            set_weight_attrs(self.weight, {"output_dim": 0})
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader})

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        """Copy this rank's rows of the full [num_embeddings, ...] tensor; padding rows get 0."""
        what = type(self).__name__
        if shard_id is not None:
            raise ValueError(f"{what} has no shards; got shard_id={shard_id!r}")
        expected = (self.num_embeddings, *param_shape(param)[1:])
        if tuple(loaded_weight.shape) != expected:
            raise ValueError(
                f"{what}: checkpoint tensor of shape {tuple(loaded_weight.shape)} should have "
                f"shape {expected}"
            )
        start = min(self.vocab_start, self.num_embeddings)
        rows = loaded_weight.narrow(0, start, self.num_real_rows)  # [num_real_rows, ...]
        if getattr(param, "store_slice", None) is None:
            param.data.zero_()  # padding rows (a packed weight pads itself after loading)
        store_slice(param, rows, 0, 0, what)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.linear_method is not None:
            return self.linear_method.embedding(self, ids, self.params_dtype)
        return F.embedding(ids, self.weight)  # [*ids.shape, embedding_dim]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size == 1:
            return self._lookup(input_ids)  # [*input_ids.shape, embedding_dim]
        local_ids = input_ids - self.vocab_start
        in_shard = (local_ids >= 0) & (local_ids < self.rows_per_rank)
        local_ids = torch.where(in_shard, local_ids, 0)  # [*input_ids.shape]
        out = self._lookup(local_ids)  # [*input_ids.shape, embedding_dim]
        out = out.masked_fill(~in_shard.unsqueeze(-1), 0)
        return all_reduce(out, self.parallel)

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, padded={self.num_embeddings_padded}, "
            f"dim={self.embedding_dim}, rank={self.parallel.rank}/{self.parallel.world_size}"
        )


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection sharded like the embedding; `LogitsProcessor` applies and gathers it."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bias: bool = False,
        parallel: ParallelInfo = SINGLE_PROCESS,
        params_dtype: torch.dtype | None = None,
        padding_size: int = DEFAULT_VOCAB_PADDING,
        linear_method: LinearMethod | None = None,
    ) -> None:
        super().__init__(
            num_embeddings, embedding_dim, parallel, params_dtype, padding_size, linear_method
        )
        self.tied_embedding: VocabParallelEmbedding | None = None
        if bias:
            data = torch.empty(self.rows_per_rank, dtype=self.params_dtype)  # [rows_per_rank]
            self.bias = nn.Parameter(data, requires_grad=False)
            set_weight_attrs(self.bias, {"output_dim": 0, "weight_loader": self.weight_loader})
        else:
            self.register_parameter("bias", None)

    def tie_weights(self, embedding: VocabParallelEmbedding) -> ParallelLMHead:
        """Use `embedding`'s weight as this head's (tied input/output embeddings)."""
        mine = (self.num_embeddings_padded, self.embedding_dim, self.parallel.rank)
        theirs = (embedding.num_embeddings_padded, embedding.embedding_dim, embedding.parallel.rank)
        if mine != theirs:
            raise ValueError(
                f"cannot tie weights: LM head (padded vocab, dim, rank) {mine} differs from the "
                f"embedding's {theirs}"
            )
        self.weight = embedding.weight
        if embedding.linear_method is not None:  # packed rows live on the embedding module
            self.tied_embedding = embedding
        return self

    def projection(self) -> tuple[nn.Module, LinearMethod | None]:
        """(module holding the weight, its packed linear method or None for a dense weight)."""
        source = self.tied_embedding or self
        return source, source.linear_method

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is applied by LogitsProcessor, not called directly")

    def process_weights_after_loading(self) -> None:
        """Keep the copy of the weight that large CPU batches use, if any (ops.dense.batch_copy)."""
        copy = dense.batch_copy(self.weight)
        if copy is not None:
            self.register_buffer("batch_weight", copy, persistent=False)
