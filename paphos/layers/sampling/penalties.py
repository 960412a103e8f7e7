"""History-based samplers: presence/frequency/repetition penalties, no-repeat-ngram and DRY.

Each gets only the rows that use it and `history` [rows, max_len] long: the prompt + output tokens
right-aligned (the last token in the last column), padded on the left with -1.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")
DRY_MAX_MATCH = 1000  # longest repeat DRY measures (Aphrodite's cap)


def apply_penalties(
    logits: Tensor,
    history: Tensor,
    num_output: Tensor,
    presence: Tensor,
    frequency: Tensor,
    repetition: Tensor,
    repetition_range: Tensor,
) -> Tensor:
    """OpenAI presence/frequency penalties over the output tokens; the multiplicative repetition
    penalty (logit / p if positive, logit * p otherwise) over the last `repetition_range` tokens
    of prompt + output (0: all of them)."""
    rows, vocab = logits.shape
    length = history.shape[1]
    pos = torch.arange(length, device=logits.device)  # [max_len]
    valid = history >= 0  # [rows, max_len]
    ids = torch.where(valid, history, vocab)  # [rows, max_len]; padding -> spare column
    is_output = valid & (pos >= length - num_output.unsqueeze(1))
    counts = torch.zeros(rows, vocab + 1, dtype=logits.dtype, device=logits.device)  # [rows, V+1]
    counts.scatter_add_(1, torch.where(is_output, ids, vocab), is_output.to(logits.dtype))
    counts = counts[:, :vocab]
    window = (repetition_range == 0).unsqueeze(1) | (pos >= length - repetition_range.unsqueeze(1))
    seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=logits.device)  # [rows, V+1]
    seen.scatter_(1, torch.where(valid & window, ids, vocab), True)
    rep = torch.where(seen[:, :vocab], repetition.unsqueeze(1), torch.ones_like(logits))
    logits = torch.where(logits > 0, logits / rep, logits * rep)
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0)


def apply_no_repeat_ngram(logits: Tensor, history: Tensor, size: Tensor) -> Tensor:
    """Ban every token that would complete an n-gram (n = size [rows], >= 1) already present in
    prompt + output."""
    rows, vocab = logits.shape
    length = history.shape[1]
    max_n = int(size.max())
    pad = torch.full((rows, max_n), -2, dtype=history.dtype, device=history.device)  # [rows, max_n]
    padded = torch.cat([history, pad], dim=1)  # [rows, max_len + max_n]
    match = history >= 0  # [rows, max_len]: an n-gram may start at each real position
    for t in range(max_n - 1):
        current = history.gather(1, (length - size + 1 + t).clamp(0, length - 1).unsqueeze(1))
        in_prefix = (t < size - 1).unsqueeze(1)  # [rows, 1]
        match &= ~in_prefix | (padded[:, t : t + length] == current)
    last_pos = torch.arange(length, device=logits.device) + (size - 1).unsqueeze(1)  # [rows, L]
    match &= last_pos <= length - 1
    banned = padded.gather(1, last_pos)  # [rows, max_len]
    ban = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=logits.device)  # [rows, V+1]
    ban.scatter_(1, torch.where(match, banned, vocab), True)
    return logits.masked_fill(ban[:, :vocab], NEG_INF)


def dry_match_lengths(history: Tensor, breakers: Tensor, dry_range: Tensor) -> Tensor:
    """[rows, max_len - 1]: at each earlier position i, how many tokens ending at i equal the
    tokens ending at the last position, not crossing a sequence breaker on the current side and
    staying inside the last dry_range tokens (0: all). 0 where the last token is a breaker."""
    length = history.shape[1]
    pos = torch.arange(length, device=history.device)  # [max_len]
    is_breaker = (history.unsqueeze(2) == breakers.unsqueeze(1)).any(dim=2) & (history >= 0)
    valid = (history >= 0) & (
        (dry_range == 0).unsqueeze(1) | (pos >= length - dry_range.unsqueeze(1))
    )  # [rows, max_len]
    suffix_ok = ~is_breaker & (history >= 0)  # [rows, max_len]
    alive = (history[:, :-1] == history[:, -1:]) & valid[:, :-1] & suffix_ok[:, -1:]
    alive &= ~is_breaker[:, 1:]  # the token that followed must not be a breaker
    lengths = alive.long()  # [rows, max_len - 1]
    for k in range(1, min(length - 1, DRY_MAX_MATCH)):
        j = length - 1 - k  # the current side's position
        step = (history[:, :j] == history[:, j : j + 1]) & valid[:, :j] & suffix_ok[:, j : j + 1]
        alive[:, :k] = False
        alive[:, k:] &= step
        lengths += alive
        if k % 16 == 0 and not bool(alive.any()):
            break
    return lengths


def apply_dry(
    logits: Tensor,
    history: Tensor,
    breakers: Tensor,
    multiplier: Tensor,
    base: Tensor,
    allowed_length: Tensor,
    dry_range: Tensor,
) -> Tensor:
    """DRY: a token that would extend a repeat of n >= allowed_length tokens loses
    multiplier * base ** (n - allowed_length) (n: its longest such repeat). breakers [rows, B]
    long, padded with -2."""
    rows, vocab = logits.shape
    lengths = dry_match_lengths(history, breakers, dry_range)  # [rows, max_len - 1]
    penalized = lengths >= allowed_length.unsqueeze(1)
    next_ids = torch.where(penalized, history[:, 1:], vocab)  # [rows, max_len - 1]
    exponent = (lengths - allowed_length.unsqueeze(1)).to(logits.dtype)
    # Penalties grow with the match length (base > 1): the largest per token is its longest match.
    per_position = torch.where(
        penalized, multiplier.unsqueeze(1) * base.unsqueeze(1).pow(exponent), 0.0
    )  # [rows, max_len - 1]
    penalty = torch.zeros(rows, vocab + 1, dtype=logits.dtype, device=logits.device)  # [rows, V+1]
    penalty.scatter_reduce_(1, next_ids, per_position, reduce="amax")
    return logits - penalty[:, :vocab]
