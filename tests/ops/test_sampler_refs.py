"""Slow per-sequence references of every sampler, in plain Python/NumPy (float64), written from each
algorithm's definition. Each takes one row of logits (np.ndarray [vocab]) and returns new logits,
-inf where a token is removed."""

from __future__ import annotations

import math

import numpy as np

NEG_INF = -np.inf


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def top_k(x: np.ndarray, k: int) -> np.ndarray:
    kth = sorted(x, reverse=True)[k - 1]
    return np.where(x < kth, NEG_INF, x)


def top_p(x: np.ndarray, p: float) -> np.ndarray:
    probs = softmax(x)
    out = x.copy()
    removed = 0.0
    for i in np.argsort(x, kind="stable")[:-1]:  # least likely first, never the top token
        if removed + probs[i] > 1 - p:
            break
        removed += probs[i]
        out[i] = NEG_INF
    return out


def top_a(x: np.ndarray, a: float) -> np.ndarray:
    probs = softmax(x)
    return np.where(probs < a * probs.max() ** 2, NEG_INF, x)


def min_p(x: np.ndarray, m: float) -> np.ndarray:
    probs = softmax(x)
    return np.where(probs < m * probs.max(), NEG_INF, x)


def tfs(x: np.ndarray, z: float) -> np.ndarray:
    order = np.argsort(-x, kind="stable")
    probs = softmax(x)[order]
    d2 = [abs(probs[i] - 2 * probs[i + 1] + probs[i + 2]) for i in range(len(probs) - 2)]
    total = sum(d2)
    out = x.copy()
    running = 0.0
    for i, d in enumerate(d2):
        running += d
        if total > 0 and running / total > z:
            out[order[i + 1]] = NEG_INF
    out[order[-1]] = NEG_INF
    return out


def _entropy(probs: np.ndarray) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


def eta_cutoff(x: np.ndarray, eta: float) -> np.ndarray:
    probs = softmax(x)
    e = eta * 1e-4
    eps = min(e, math.sqrt(e) * math.exp(-_entropy(probs)))
    out = np.where(probs < eps, NEG_INF, x)
    out[np.argmax(probs)] = x[np.argmax(probs)]
    return out


def epsilon_cutoff(x: np.ndarray, eps: float) -> np.ndarray:
    probs = softmax(x)
    out = np.where(probs < eps * 1e-4, NEG_INF, x)
    out[np.argmax(probs)] = x[np.argmax(probs)]
    return out


def typical_p(x: np.ndarray, tau: float) -> np.ndarray:
    probs = softmax(x)
    entropy = _entropy(probs)

    def deviation(i: int) -> float:
        return abs(-math.log(probs[i]) - entropy) if probs[i] > 0 else math.inf

    order = sorted(range(len(x)), key=deviation)
    out = x.copy()
    mass = 0.0
    for rank, i in enumerate(order):
        mass += probs[i]
        if rank > 0 and mass >= tau:
            out[i] = NEG_INF
    return out


def top_nsigma(x: np.ndarray, n: float) -> np.ndarray:
    finite = x[np.isfinite(x)]
    std = np.std(finite, ddof=1) if len(finite) > 1 else 0.0
    return np.where(x < finite.max() - n * std, NEG_INF, x)


def temperature(x: np.ndarray, t: float, lo: float, hi: float, exponent: float) -> np.ndarray:
    if lo != 0 or hi != 0:
        finite = np.isfinite(x)
        probs = softmax(x)
        normalized = _entropy(probs) / math.log(finite.sum())
        t = lo + (hi - lo) * normalized**exponent
    return x / max(t, 2e-5)


def quadratic(x: np.ndarray, factor: float, curve: float) -> np.ndarray:
    top = np.max(x)
    out = x.copy()
    for i, v in enumerate(x):
        if np.isfinite(v):
            d = v - top
            out[i] = top - factor * (3 - curve) / 2 * d * d + factor * (curve - 1) / 2 * d**3
    return out


def xtc(x: np.ndarray, threshold: float) -> np.ndarray:
    probs = softmax(x)
    above = [i for i in range(len(x)) if probs[i] >= threshold]
    out = x.copy()
    if len(above) >= 2:
        keep = min(above, key=lambda i: probs[i])
        for i in above:
            if i != keep:
                out[i] = NEG_INF
    return out


def penalties(
    x: np.ndarray,
    prompt: list[int],
    output: list[int],
    presence: float,
    frequency: float,
    repetition: float,
    rep_range: int,
) -> np.ndarray:
    out = x.copy()
    sequence = prompt + output
    window = sequence[-rep_range:] if rep_range > 0 else sequence
    for token in set(window):
        out[token] = out[token] / repetition if out[token] > 0 else out[token] * repetition
    for token in set(output):
        out[token] -= frequency * output.count(token) + presence
    return out


def no_repeat_ngram(x: np.ndarray, sequence: list[int], n: int) -> np.ndarray:
    out = x.copy()
    prefix = sequence[len(sequence) - n + 1 :] if n > 1 else []
    for start in range(len(sequence) - n + 1):
        gram = sequence[start : start + n]
        if gram[:-1] == prefix:
            out[gram[-1]] = NEG_INF
    return out


def dry(
    x: np.ndarray,
    sequence: list[int],
    multiplier: float,
    base: float,
    allowed: int,
    breakers: set[int],
    dry_range: int,
) -> np.ndarray:
    """ooba's definition: for each earlier occurrence of the last token, extend the match
    backwards (stopping at a breaker on the current side) and penalize the token that followed."""
    start = max(0, len(sequence) - dry_range) if dry_range > 0 else 0
    last = sequence[-1]
    out = x.copy()
    if last in breakers:
        return out
    longest: dict[int, int] = {}
    for i in range(start, len(sequence) - 1):
        if sequence[i] != last or sequence[i + 1] in breakers:
            continue
        length = 1
        while i - length >= start:
            current = sequence[-(length + 1)]
            if sequence[i - length] != current or current in breakers:
                break
            length += 1
        nxt = sequence[i + 1]
        longest[nxt] = max(longest.get(nxt, 0), length)
    for token, length in longest.items():
        if length >= allowed:
            out[token] -= multiplier * base ** (length - allowed)
    return out


def mirostat(x: np.ndarray, mu: float) -> np.ndarray:
    probs = softmax(x)
    surprisal = -np.log2(probs)
    out = np.where(surprisal > mu, NEG_INF, x)
    out[np.argmax(x)] = x[np.argmax(x)]
    return out


def skew_probs(x: np.ndarray, skew: float) -> np.ndarray:
    probs = softmax(x)
    order = np.argsort(-probs, kind="stable")
    out = np.zeros_like(probs)
    previous = 0.0
    running = 0.0
    for i in order:
        running += probs[i]
        value = min(running, 1.0) ** math.exp(skew)
        out[i] = max(value - previous, 0.0) if probs[i] > 0 else 0.0
        previous = value
    return out
