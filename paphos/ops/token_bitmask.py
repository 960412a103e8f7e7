"""Applying a packed token bitmask to logit rows: disallowed tokens get -inf. The bitmask is
xgrammar's layout: int32 words, bit j of word i allows token 32 i + j. Plain torch ops, so one
function serves every device (the mask is unpacked on the device the logits are on)."""

from __future__ import annotations

import torch


def unpack_token_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bitmask [rows, words] int32 -> allowed [rows, vocab_size] bool."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)  # [32]
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]
    allowed = bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()  # [rows, <= vocab_size]
    if allowed.shape[1] < vocab_size:  # logits wider than the tokenizer's vocabulary: padding
        allowed = torch.nn.functional.pad(allowed, (0, vocab_size - allowed.shape[1]))
    return allowed  # [rows, vocab_size]


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """logits [n, vocab] with the bitmask's rows applied (rows [m] long: which logit rows the
    bitmask's m rows are; None: all, m == n). Returns a new tensor; `logits` is not changed."""
    allowed = unpack_token_bitmask(bitmask, logits.shape[-1])  # [m, vocab]
    if rows is None:
        return logits.masked_fill(~allowed, float("-inf"))
    masked = logits.index_select(0, rows).masked_fill(~allowed, float("-inf"))  # [m, vocab]
    return logits.index_copy(0, rows, masked)
