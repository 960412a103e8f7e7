"""The token bitmask op against xgrammar's own CPU kernel (the layout's definition), on rows of a
batch that mixes constrained and free rows; the CPU path picked for CPU runners is xgrammar's;
and on CUDA against the CPU result."""

from __future__ import annotations

import pytest
import torch

from paphos.ops.token_bitmask import (
    apply_token_bitmask,
    apply_token_bitmask_cpu,
    bitmask_op,
    unpack_token_bitmask,
)


def _random_bitmask(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    words = (vocab + 31) // 32
    return torch.randint(-(2**31), 2**31 - 1, (rows, words), generator=g, dtype=torch.int32)


@pytest.mark.parametrize("vocab", [64, 100, 49152])
def test_matches_xgrammar_on_chosen_rows(vocab: int) -> None:
    pytest.importorskip("xgrammar")
    logits = torch.randn(5, vocab)  # [5, vocab]
    bitmask = _random_bitmask(5, vocab, seed=vocab)
    rows = torch.tensor([0, 2, 4])  # 1 and 3 are free: their bitmask rows are never read
    ours = apply_token_bitmask(logits.clone(), bitmask, rows)
    theirs = apply_token_bitmask_cpu(logits.clone(), bitmask, rows)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[1], logits[1]) and torch.equal(ours[3], logits[3])
    allowed = unpack_token_bitmask(bitmask[:1], vocab)[0]
    assert torch.equal(ours[0].isfinite(), allowed)
    assert bitmask_op(torch.device("cpu")) is apply_token_bitmask_cpu


def test_unpack_pads_logits_wider_than_the_mask() -> None:
    bitmask = torch.tensor([[0b101]], dtype=torch.int32)  # tokens 0 and 2 of 32
    allowed = unpack_token_bitmask(bitmask, 40)
    assert allowed.shape == (1, 40)
    assert allowed[0].nonzero().flatten().tolist() == [0, 2]


@pytest.mark.gpu
def test_cuda_equals_cpu() -> None:
    logits = torch.randn(8, 49152)
    bitmask = _random_bitmask(8, 49152, seed=1)
    rows = torch.tensor([1, 3, 5, 7])
    expected = apply_token_bitmask(logits.clone(), bitmask, rows)
    got = apply_token_bitmask(logits.cuda(), bitmask.cuda(), rows.cuda()).cpu()
    assert torch.equal(got, expected)
    assert bitmask_op(torch.device("cuda")) is apply_token_bitmask
