"""Applying a packed token bitmask to logit rows, in place: disallowed tokens get -inf (so a masked
token also reports logprob -inf: the constrained distribution is the one sampled from). The bitmask
is xgrammar's layout, one row per logits row: int32 words, bit j of word i allows token 32 i + j;
`rows` says which rows are constrained (the others' bitmask rows are never read).

`apply_token_bitmask` is the torch reference and the device path (the words' bytes index a
256-entry table of their 8 bits); on CPU `apply_token_bitmask_cpu` runs xgrammar's own C++ loop,
about 25x faster there. `bitmask_op(device)` picks one, once per runner."""

from __future__ import annotations

from collections.abc import Callable

import torch

_BYTE_BITS: dict[torch.device, torch.Tensor] = {}  # device -> [256, 8] bool (a constant table)

BitmaskOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _byte_bits(device: torch.device) -> torch.Tensor:
    table = _BYTE_BITS.get(device)
    if table is None:
        values = torch.arange(256, device=device).unsqueeze(-1)  # [256, 1]
        table = ((values >> torch.arange(8, device=device)) & 1).bool()  # [256, 8]
        _BYTE_BITS[device] = table
    return table


def unpack_token_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bitmask [rows, words] int32 -> allowed [rows, vocab_size] bool."""
    num_rows = bitmask.shape[0]
    assert torch.tensor([1], dtype=torch.int32).view(torch.uint8)[0] == 1, "big-endian host"
    as_bytes = bitmask.contiguous().view(torch.uint8)  # [rows, 4 words], little-endian
    allowed = _byte_bits(bitmask.device)[as_bytes.long()].view(num_rows, -1)  # [rows, 32 words]
    allowed = allowed[:, :vocab_size]
    if allowed.shape[1] < vocab_size:  # logits wider than the tokenizer's vocabulary: padding
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]))
    return allowed  # [rows, vocab_size]


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """logits [n, vocab], bitmask [n, words] int32, rows [m] long (the constrained rows)."""
    allowed = unpack_token_bitmask(bitmask.index_select(0, rows), logits.shape[-1])  # [m, vocab]
    minus_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    masked = torch.where(allowed, logits.index_select(0, rows), minus_inf)  # [m, vocab]
    return logits.index_copy_(0, rows, masked)


def apply_token_bitmask_cpu(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """The same on CPU tensors, by xgrammar's kernel (only called for constrained requests, so
    xgrammar is there)."""
    import xgrammar

    xgrammar.apply_token_bitmask_inplace(logits, bitmask, indices=rows.tolist())
    return logits


def bitmask_op(device: torch.device) -> BitmaskOp:
    if device.type == "cpu":
        return apply_token_bitmask_cpu
    return apply_token_bitmask
