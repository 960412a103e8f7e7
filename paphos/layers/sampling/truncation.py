"""Truncation samplers: each sets the logits of removed tokens to -inf and never removes the most
likely token. Every function gets only the rows that use it (logits [rows, vocab], params [rows]).

Definitions follow Aphrodite's: top-k keeps ties with the k-th logit; top-p removes the least likely
tokens while the mass left above them stays >= top_p; eta/epsilon cutoffs are in units of 1e-4.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")


def apply_top_k(logits: Tensor, top_k: Tensor) -> Tensor:
    """top_k [rows] long, >= 1 (rows with top_k off are not passed)."""
    vocab = logits.shape[1]
    k = top_k.clamp(1, vocab)
    top_values = torch.topk(logits, int(k.max()), dim=-1).values  # [rows, max_k]
    kth = top_values.gather(1, (k - 1).unsqueeze(1))  # [rows, 1]
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    sorted_logits, order = logits.sort(dim=-1)  # ascending, [rows, vocab]
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [rows, vocab]
    remove_sorted = cumulative <= (1 - top_p).unsqueeze(1)
    remove_sorted[:, -1] = False
    remove = torch.zeros_like(remove_sorted).scatter_(1, order, remove_sorted)  # [rows, vocab]
    return logits.masked_fill(remove, NEG_INF)


def apply_top_a(logits: Tensor, top_a: Tensor) -> Tensor:
    probs = logits.softmax(dim=-1)  # [rows, vocab]
    top = probs.max(dim=-1, keepdim=True).values  # [rows, 1]
    return logits.masked_fill(probs < top.square() * top_a.unsqueeze(1), NEG_INF)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    probs = logits.softmax(dim=-1)  # [rows, vocab]
    top = probs.max(dim=-1, keepdim=True).values  # [rows, 1]
    return logits.masked_fill(probs < top * min_p.unsqueeze(1), NEG_INF)


def apply_tfs(logits: Tensor, tfs: Tensor) -> Tensor:
    """Tail-free sampling: cut where the normalized |second difference| of the sorted probs sums
    past tfs. As in Aphrodite, the least likely token is always removed."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [rows, vocab]
    d2 = sorted_logits.softmax(dim=-1).diff().diff().abs()  # [rows, vocab - 2]
    total = d2.sum(dim=-1, keepdim=True)  # [rows, 1]
    cdf = (d2 / total).cumsum(dim=-1)  # [rows, vocab - 2]; NaN (keeps all) when total == 0
    rows = logits.shape[0]
    remove_sorted = torch.cat(
        [
            torch.zeros(rows, 1, dtype=torch.bool, device=logits.device),  # [rows, 1]
            cdf > tfs.unsqueeze(1),
            torch.ones(rows, 1, dtype=torch.bool, device=logits.device),  # [rows, 1]
        ],
        dim=-1,
    )[:, : logits.shape[1]]  # [rows, vocab]
    remove_sorted[:, 0] = False
    remove = torch.zeros_like(remove_sorted).scatter_(1, order, remove_sorted)  # [rows, vocab]
    return logits.masked_fill(remove, NEG_INF)


def apply_eta_cutoff(logits: Tensor, eta_cutoff: Tensor) -> Tensor:
    eta = eta_cutoff * 1e-4  # [rows]
    logp = logits.log_softmax(dim=-1)  # [rows, vocab]
    probs = logp.exp()
    neg_entropy = (probs * logp).nansum(dim=-1)  # [rows]
    eps = torch.minimum(eta, eta.sqrt() * neg_entropy.exp()).unsqueeze(1)  # [rows, 1]
    return _cut_below(logits, probs, eps)


def apply_epsilon_cutoff(logits: Tensor, epsilon_cutoff: Tensor) -> Tensor:
    probs = logits.softmax(dim=-1)  # [rows, vocab]
    return _cut_below(logits, probs, (epsilon_cutoff * 1e-4).unsqueeze(1))


def apply_typical_p(logits: Tensor, typical_p: Tensor) -> Tensor:
    """Locally typical sampling: keep the tokens whose surprisal is closest to the entropy, until
    their mass reaches typical_p (the token that reaches it is removed, as in Aphrodite)."""
    logp = logits.log_softmax(dim=-1)  # [rows, vocab]
    probs = logp.exp()
    neg_entropy = (probs * logp).nansum(dim=-1, keepdim=True)  # [rows, 1]
    deviation = (neg_entropy - logp).abs()  # [rows, vocab]
    order = deviation.argsort(dim=-1, stable=True)  # [rows, vocab]
    remove_sorted = probs.gather(1, order).cumsum(dim=-1) >= typical_p.unsqueeze(1)
    remove_sorted[:, 0] = False
    remove = torch.zeros_like(remove_sorted).scatter_(1, order, remove_sorted)  # [rows, vocab]
    return logits.masked_fill(remove, NEG_INF)


def apply_top_nsigma(logits: Tensor, nsigma: Tensor) -> Tensor:
    """Keep logits >= max - nsigma * std, the std (unbiased) taken over the finite logits only
    (Aphrodite's std over all logits is NaN once any token is banned)."""
    finite = torch.isfinite(logits)  # [rows, vocab]
    count = finite.sum(dim=-1, keepdim=True)  # [rows, 1]
    values = torch.where(finite, logits, torch.zeros_like(logits))
    mean = values.sum(dim=-1, keepdim=True) / count
    sq = torch.where(finite, (logits - mean).square(), torch.zeros_like(logits))
    std = (sq.sum(dim=-1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()  # [rows, 1]
    top = logits.max(dim=-1, keepdim=True).values  # [rows, 1]
    return logits.masked_fill(logits < top - nsigma.unsqueeze(1) * std, NEG_INF)


def _cut_below(logits: Tensor, probs: Tensor, threshold: Tensor) -> Tensor:
    remove = probs < threshold  # [rows, vocab]
    remove.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, NEG_INF)
