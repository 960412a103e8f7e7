"""Samplers that reshape the distribution: temperature (static and dynamic), quadratic/cubic
smoothing, XTC, skew and Mirostat v2. Each gets only the rows that use it; `-inf` logits stay -inf.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NEG_INF = float("-inf")
MIN_TEMPERATURE = 2e-5  # Aphrodite's floor: keeps logits / t finite in float32
BITS_PER_NAT = 1.0 / math.log(2)


def apply_temperature(
    logits: Tensor, temperature: Tensor, dyn_min: Tensor, dyn_max: Tensor, dyn_exp: Tensor
) -> Tensor:
    """Divide by the temperature; a row with dynatemp_min or dynatemp_max set instead uses
    min + (max - min) * (entropy / max_entropy) ** exponent, max_entropy = log(#finite logits)."""
    dynamic = (dyn_min != 0) | (dyn_max != 0)  # [rows]
    logp = logits.log_softmax(dim=-1)  # [rows, vocab]
    entropy = -(logp.exp() * logp).nansum(dim=-1)  # [rows]
    max_entropy = torch.isfinite(logits).sum(dim=-1).float().log()  # [rows]
    dyn_temp = dyn_min + (dyn_max - dyn_min) * (entropy / max_entropy).pow(dyn_exp)
    t = torch.where(dynamic, dyn_temp, temperature)  # [rows]
    t = torch.where(torch.isnan(t) | (t < MIN_TEMPERATURE), MIN_TEMPERATURE, t)
    return logits / t.unsqueeze(1)


def apply_quadratic(logits: Tensor, factor: Tensor, curve: Tensor) -> Tensor:
    """Quadratic (and cubic) smoothing around the top logit m: with d = x - m,
    x' = m - k d^2 + s d^3, k = factor (3 - curve) / 2, s = factor (curve - 1) / 2."""
    k = (factor * (3 - curve) / 2).unsqueeze(1)  # [rows, 1]
    s = (factor * (curve - 1) / 2).unsqueeze(1)  # [rows, 1]
    top = logits.max(dim=-1, keepdim=True).values  # [rows, 1]
    d = logits - top  # [rows, vocab]
    smoothed = top - k * d.square() + s * d.pow(3)
    return torch.where(torch.isfinite(logits), smoothed, logits)


def apply_xtc(logits: Tensor, threshold: Tensor, fire: Tensor) -> Tensor:
    """Exclude Top Choices: in rows where `fire` [rows] bool is set, remove every token whose
    probability is >= threshold except the least likely of them."""
    probs = logits.softmax(dim=-1)  # [rows, vocab]
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [rows, vocab]
    remove_sorted = torch.zeros_like(sorted_probs, dtype=torch.bool)  # [rows, vocab]
    remove_sorted[:, :-1] = sorted_probs[:, 1:] >= threshold.unsqueeze(1)
    remove_sorted &= fire.unsqueeze(1)
    remove = torch.zeros_like(remove_sorted).scatter_(1, order, remove_sorted)  # [rows, vocab]
    return logits.masked_fill(remove, NEG_INF)


def apply_skew(logits: Tensor, skew: Tensor) -> Tensor:
    """Skew the distribution: with the probabilities sorted from most to least likely and c their
    running sum, the new probabilities are the differences of c ** exp(skew). skew > 0 moves mass
    toward less likely tokens, skew < 0 toward the most likely ones."""
    probs = logits.softmax(dim=-1)  # [rows, vocab]
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [rows, vocab]
    cumulative = sorted_probs.cumsum(dim=-1).clamp(0, 1).pow(skew.exp().unsqueeze(1))
    new_sorted = torch.diff(cumulative, dim=-1, prepend=torch.zeros_like(cumulative[:, :1]))
    new_sorted = torch.where(sorted_probs > 0, new_sorted.clamp(min=0), 0.0)
    new_probs = torch.zeros_like(probs).scatter_(1, order, new_sorted)  # [rows, vocab]
    return new_probs.log()


def apply_mirostat(logits: Tensor, mu: Tensor) -> Tensor:
    """Mirostat v2: remove tokens whose surprisal (bits) exceeds mu, always keeping the top one."""
    surprisal = -logits.log_softmax(dim=-1) * BITS_PER_NAT  # [rows, vocab]
    remove = surprisal > mu.unsqueeze(1)
    remove.scatter_(1, logits.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, NEG_INF)


def mirostat_update(
    logits: Tensor, token_ids: Tensor, mu: Tensor, tau: Tensor, eta: Tensor
) -> Tensor:
    """New mu after sampling `token_ids`: mu - eta * (surprisal of the token - tau)."""
    logp = logits.log_softmax(dim=-1).gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [rows]
    return mu - eta * (-logp * BITS_PER_NAT - tau)
