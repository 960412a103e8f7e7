"""Per-step batched inputs of the sampler, built from the running requests' sampling states.

`PARAM_COLUMNS` names the columns of the [rows, columns] float32 parameter table; `used_samplers`
says which samplers a request really uses, so a sampler no row uses is skipped entirely.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from paphos.sampling_params import SamplingParams

PARAM_COLUMNS: tuple[str, ...] = (
    "temperature",
    "dynatemp_min",
    "dynatemp_max",
    "dynatemp_exponent",
    "top_p",
    "top_k",
    "top_a",
    "min_p",
    "tfs",
    "eta_cutoff",
    "epsilon_cutoff",
    "typical_p",
    "smoothing_factor",
    "smoothing_curve",
    "xtc_threshold",
    "xtc_probability",
    "nsigma",
    "skew",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "repetition_penalty_range",
    "no_repeat_ngram_size",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "dry_range",
    "mirostat_tau",
    "mirostat_eta",
)
COLUMN = {name: i for i, name in enumerate(PARAM_COLUMNS)}
# Columns appended per step after PARAM_COLUMNS (they change as the request runs).
MU_COLUMN = len(PARAM_COLUMNS)
NUM_OUTPUT_COLUMN = MU_COLUMN + 1
HISTORY_SAMPLERS = frozenset({"penalties", "no_repeat_ngram", "dry"})


def to_device(data: object, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """Host data (a list, or a CPU tensor) as a tensor on `device` without waiting for the
    device's queued work: on CUDA through pinned memory and a non-blocking copy (a plain copy
    would wait for the whole stream, i.e. the forward an overlapped step has just queued)."""
    t = data if isinstance(data, Tensor) else torch.tensor(data, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def used_samplers(params: SamplingParams, vocab_size: int) -> frozenset[str]:
    """Samplers that change this request's distribution (history-free checks only)."""
    p = params
    used = set()
    if p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1:
        used.add("penalties")
    if p.no_repeat_ngram_size > 0:
        used.add("no_repeat_ngram")
    if p.dry_multiplier > 0:
        used.add("dry")
    if p.is_greedy:  # shaping and truncation never move the argmax, or are random: skipped
        return frozenset(used)
    checks = {
        "temperature": p.temperature != 1 or p.dynatemp_min != 0 or p.dynatemp_max != 0,
        "top_nsigma": p.nsigma > 0,
        "top_k": 0 < p.top_k < vocab_size,
        "top_p": p.top_p < 1,
        "top_a": p.top_a > 0,
        "min_p": p.min_p > 0,
        "tfs": p.tfs < 1,
        "eta_cutoff": p.eta_cutoff > 0,
        "epsilon_cutoff": p.epsilon_cutoff > 0,
        "typical_p": p.typical_p < 1,
        "quadratic": p.smoothing_factor > 0,
        "xtc": p.xtc_probability > 0,
        "skew": p.skew != 0,
        "mirostat": p.mirostat_mode == 2,
    }
    used.update(name for name, on in checks.items() if on)
    return frozenset(used)


def param_row(params: SamplingParams) -> tuple[float, ...]:
    row = [float(getattr(params, name)) for name in PARAM_COLUMNS]
    if params.is_greedy:
        row[COLUMN["temperature"]] = 1.0
    return tuple(row)


def right_aligned(rows: Sequence[Sequence[int]], pad: int) -> Tensor:
    """[len(rows), max_len] long on the CPU, each row's tokens in the last columns."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), pad, dtype=torch.long)  # [rows, max_len]
    for i, r in enumerate(rows):
        if r:
            out[i, out.shape[1] - len(r) :] = torch.as_tensor(r, dtype=torch.long)
    return out


def sparse_bans(
    ban_lists: Sequence[Sequence[int]], device: torch.device
) -> tuple[Tensor, Tensor] | None:
    """(row ids, token ids) of every (row, token) pair to set to -inf; None when none."""
    rows = [i for i, bans in enumerate(ban_lists) for _ in bans]
    if not rows:
        return None
    cols = [t for bans in ban_lists for t in bans]
    return (
        to_device(rows, device, torch.long),  # [num_bans]
        to_device(cols, device, torch.long),  # [num_bans]
    )


def bad_word_prefixes(
    words_per_row: Sequence[Sequence[Sequence[int]]], device: torch.device
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Multi-token bad words: (row [W], prefix [W, P] right-aligned -3 padded, last token [W])."""
    entries = [(i, w) for i, words in enumerate(words_per_row) for w in words if len(w) > 1]
    if not entries:
        return None
    rows = to_device([i for i, _ in entries], device, torch.long)  # [W]
    prefixes = to_device(right_aligned([w[:-1] for _, w in entries], pad=-3), device)  # [W, P]
    last = to_device([w[-1] for _, w in entries], device, torch.long)  # [W]
    return rows, prefixes, last


def ban_bad_words(logits: Tensor, history: Tensor, words: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Ban a bad word's last token where the sequence ends with the rest of it."""
    rows, prefixes, last = words
    width = prefixes.shape[1]
    if history.shape[1] < width:
        pad = torch.full(
            (history.shape[0], width - history.shape[1]),
            -1,
            dtype=history.dtype,
            device=history.device,
        )  # [rows, missing]
        history = torch.cat([pad, history], dim=1)  # [rows, width]
    suffix = history[rows, history.shape[1] - width :]  # [W, P]
    hit = ((prefixes == suffix) | (prefixes == -3)).all(dim=1)  # [W]
    vocab = logits.shape[1]
    ban = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
    ban[rows, torch.where(hit, last, vocab)] = True  # [rows, V+1]
    return logits.masked_fill(ban[:, :vocab], float("-inf"))
