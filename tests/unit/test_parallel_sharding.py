"""Sharding rules and errors of the parallel layers, checked in one process by simulating each rank.

Building a layer and loading its shard need no communication, so a `ParallelInfo(rank, world_size)`
without a process group stands in for every rank here; the gloo test covers the collectives.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from paphos.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from paphos.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from paphos.layers.logits import LogitsProcessor
from paphos.layers.weight_utils import default_weight_loader
from paphos.parallel import ParallelInfo, all_gather, broadcast_object, init_distributed
from paphos.quant import LinearMethod, UnquantizedLinearMethod, set_weight_attrs


def _ranks(world_size: int) -> list[ParallelInfo]:
    return [ParallelInfo(rank=r, world_size=world_size) for r in range(world_size)]


class TransposedLinearMethod:
    """A test format whose checkpoint and parameter are [input, output]: loaders follow the tags."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes,
                       input_size, output_size, params_dtype):  # fmt: skip
        # [input_size_per_partition, output_size_per_partition]
        data = torch.empty(
            input_size_per_partition, sum(output_partition_sizes), dtype=params_dtype
        )
        weight = nn.Parameter(data, requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 0, "output_dim": 1})
        layer.register_parameter("weight", weight)

    def apply(self, layer, x, bias=None):
        out = x @ layer.weight  # [num_tokens, output_size_per_partition]
        return out if bias is None else out + bias

    def process_weights_after_loading(self, layer):
        layer.weight.data = layer.weight.data.contiguous()


@pytest.mark.parametrize(("rank", "world_size"), [(-1, 2), (2, 2), (0, 0), (0, "2")])
def test_parallel_info_rejects_bad_rank_or_world_size(rank, world_size):
    with pytest.raises(ValueError, match="rank=|world_size="):
        ParallelInfo(rank=rank, world_size=world_size)


def test_init_distributed_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend='mpi' is invalid"):
        init_distributed(0, 1, backend="mpi", init_method="tcp://127.0.0.1:1")


def test_collectives_are_identity_at_world_size_one_and_validate_arguments():
    x = torch.randn(2, 3)  # [2, 3]
    assert all_gather(x, ParallelInfo()) is x
    assert broadcast_object({"a": 1}, ParallelInfo()) == {"a": 1}
    with pytest.raises(ValueError, match="dim=2 is invalid"):
        all_gather(x, ParallelInfo(), dim=2)
    with pytest.raises(ValueError, match="src=1 is invalid"):
        broadcast_object(1, ParallelInfo(), src=1)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda p: ColumnParallelLinear(8, 13, parallel=p), "output_size=13 is not divisible"),
        (lambda p: RowParallelLinear(13, 8, parallel=p), "input_size=13 is not divisible"),
        (lambda p: MergedColumnParallelLinear(8, [4, 6], parallel=p), r"output_sizes\[1\]=6"),
        (lambda p: QKVParallelLinear(8, 2, 6, 2, parallel=p), "total_num_heads=6 is not"),
        (lambda p: QKVParallelLinear(8, 2, 8, 6, parallel=p), "total_num_kv_heads=6 is invalid"),
        (lambda p: ReplicatedLinear(0, 8, parallel=p), "input_size=0 is invalid"),
        (lambda p: MergedColumnParallelLinear(8, [], parallel=p), r"output_sizes=\[\] is invalid"),
        (lambda p: VocabParallelEmbedding(0, 8, parallel=p), "num_embeddings=0 is invalid"),
        (lambda p: LogitsProcessor(-1, p), "vocab_size=-1 is invalid"),
    ],
)
def test_sizes_that_do_not_shard_are_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build(ParallelInfo(rank=1, world_size=4))


def test_column_shards_concatenate_to_the_full_output_with_any_linear_method():
    w, b, x = torch.randn(12, 8), torch.randn(12), torch.randn(3, 8)
    for method, checkpoint in ((UnquantizedLinearMethod(), w), (TransposedLinearMethod(), w.T)):
        assert isinstance(method, LinearMethod)
        outputs = []
        for p in _ranks(3):
            layer = ColumnParallelLinear(8, 12, bias=True, linear_method=method, parallel=p)
            layer.weight.weight_loader(layer.weight, checkpoint)
            layer.bias.weight_loader(layer.bias, b)
            method.process_weights_after_loading(layer)
            outputs.append(layer(x))  # [3, 4]
        assert_close(torch.cat(outputs, dim=-1), F.linear(x, w, b))


def test_row_shards_sum_to_the_full_output_with_bias_once():
    w, b, x = torch.randn(8, 12), torch.randn(8), torch.randn(3, 12)
    total = torch.zeros(3, 8)  # [num_tokens, output_size]
    for p in _ranks(4):
        layer = RowParallelLinear(12, 8, bias=True, input_is_parallel=False, reduce_results=False,
                                  linear_method=TransposedLinearMethod(), parallel=p)  # fmt: skip
        layer.weight.weight_loader(layer.weight, w.T)  # this format's checkpoint is [in, out]
        layer.bias.weight_loader(layer.bias, b)
        total += layer(x)
    assert_close(total, F.linear(x, w, b))


def test_two_kv_heads_at_world_size_eight_are_each_held_by_four_ranks():
    head, heads, kv = 2, 8, 2
    wk = torch.arange(kv * head, dtype=torch.float32)[:, None].expand(-1, 4)  # row i holds i
    held = []
    for p in _ranks(8):
        layer = QKVParallelLinear(4, head, heads, kv, parallel=p)
        assert (layer.num_heads, layer.num_kv_heads) == (1, 1)
        layer.weight.weight_loader(layer.weight, wk, "k")
        k_rows = layer.weight[layer.num_heads * head : (layer.num_heads + 1) * head, 0]
        held.append(int(k_rows[0]) // head)  # which kv head this rank holds
    assert held == [0, 0, 0, 0, 1, 1, 1, 1]


def test_fused_qkv_checkpoint_loads_like_separate_tensors():
    w = torch.randn((4 + 2 * 2) * 2, 8)  # [(heads + 2 * kv_heads) * head_size, hidden]
    for p in _ranks(2):
        separate = QKVParallelLinear(8, 2, 4, 2, parallel=p)
        for sid, part in zip("qkv", w.split([8, 4, 4]), strict=True):
            separate.weight.weight_loader(separate.weight, part, sid)
        fused = QKVParallelLinear(8, 2, 4, 2, parallel=p)
        fused.weight.weight_loader(fused.weight, w)
        assert_close(fused.weight, separate.weight)


def test_weight_loaders_reject_wrong_shapes_and_shard_ids():
    p = ParallelInfo(rank=1, world_size=2)
    column, merged = (
        ColumnParallelLinear(8, 12, parallel=p),
        MergedColumnParallelLinear(8, [4, 6], parallel=p),
    )
    qkv, replicated = QKVParallelLinear(8, 2, 4, 2, parallel=p), ReplicatedLinear(8, 4, parallel=p)
    cases = [
        (lambda: column.weight.weight_loader(column.weight, torch.zeros(10, 8)), "should have 12"),
        (lambda: column.weight.weight_loader(column.weight, torch.zeros(12, 7)), r"\(6, 7\)"),
        (lambda: column.weight.weight_loader(column.weight, torch.zeros(12, 8), 0), "no shards"),
        (lambda: merged.weight.weight_loader(merged.weight, torch.zeros(4, 8), 2), "shard_id=2"),
        (lambda: merged.weight.weight_loader(merged.weight, torch.zeros(6, 8), 0), "should have 4"),
        (lambda: qkv.weight.weight_loader(qkv.weight, torch.zeros(8, 8), "o"), "shard_id='o'"),
        (lambda: qkv.weight.weight_loader(qkv.weight, torch.zeros(8, 8), "k"), "should have 4"),
        (
            lambda: replicated.weight.weight_loader(replicated.weight, torch.zeros(8, 4)),
            r"\(8, 4\)",
        ),
    ]
    for load, message in cases:
        with pytest.raises(ValueError, match=message):
            load()


def test_embedding_shards_zero_their_padding_and_reject_wrong_vocab():
    table = torch.randn(50, 4)  # [vocab, dim]
    shards = []
    for p in _ranks(3):
        layer = VocabParallelEmbedding(50, 4, parallel=p, padding_size=8)
        assert layer.num_embeddings_padded == 72 and layer.rows_per_rank == 24
        layer.weight.weight_loader(layer.weight, table)
        shards.append(layer.weight.data)
    full = torch.cat(shards)  # [72, 4]
    assert_close(full[:50], table)
    assert not full[50:].any()
    with pytest.raises(ValueError, match=r"should have shape \(50, 4\)"):
        layer.weight.weight_loader(layer.weight, torch.zeros(49, 4))


def test_lm_head_is_applied_only_through_logits_processor():
    head = ParallelLMHead(10, 4)
    with pytest.raises(RuntimeError, match="LogitsProcessor"):
        head(torch.tensor([1]))
    with pytest.raises(ValueError, match="cannot tie weights"):
        head.tie_weights(VocabParallelEmbedding(10, 8))
    with pytest.raises(ValueError, match="vocab_size=65 exceeds"):
        LogitsProcessor(65)(head, torch.zeros(1, 4))


def test_params_dtype_defaults_to_the_torch_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        layer = ColumnParallelLinear(8, 4, bias=True)
        assert layer.weight.dtype == layer.bias.dtype == torch.bfloat16
    finally:
        torch.set_default_dtype(previous)
    assert ReplicatedLinear(8, 4, params_dtype=torch.float16).weight.dtype == torch.float16
    assert VocabParallelEmbedding(8, 4).weight.dtype == previous


def test_default_weight_loader_checks_shape():
    param = nn.Parameter(torch.zeros(()), requires_grad=False)  # []
    default_weight_loader(param, torch.tensor([2.5]))
    assert float(param) == 2.5
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        default_weight_loader(param, torch.zeros(2))
