"""The sampler: every Aphrodite sampler batched over one step's rows, then one draw per row.

Order per row: logit_bias, allowed_token_ids, bans (custom_token_bans, bad_words, and EOS/stop
tokens until min_tokens), then the row's `sampler_names` order (default: Aphrodite's; Kobold ints
accepted), then Mirostat v2 and skew. Greedy rows (temperature 0) take the argmax after the bans and
the history penalties. A sampler no row uses costs nothing. Draws use the exponential race
(argmax probs / q, q ~ Exp(1)); a seeded row draws q from its own generator, seeded from (seed,
number of outputs so far), so its samples depend only on its seed and history, never on the batch.
Logprobs (sampled and prompt) report the model's raw distribution: log_softmax of the unprocessed
logits, as vLLM does by default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from paphos.layers.sampling import penalties, shaping, truncation
from paphos.layers.sampling.batch import (
    COLUMN,
    HISTORY_SAMPLERS,
    MU_COLUMN,
    NUM_OUTPUT_COLUMN,
    bad_word_prefixes,
    ban_bad_words,
    param_row,
    right_aligned,
    sparse_bans,
    to_device,
    used_samplers,
)
from paphos.layers.sampling.logprobs import LogprobsTensors, gather_logprobs
from paphos.ops.argmax import argmax_rows
from paphos.sampling_params import SamplingParams

__all__ = [
    "LogprobsTensors",
    "RequestSamplingState",
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "compute_prompt_logprobs",
]
_MASK64 = (1 << 64) - 1


class RequestSamplingState:
    """One per running request, owned by the model runner; holds what the samplers need across
    steps (token history, the seeded generator, the Mirostat mu)."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int],
        eos_token_id: int | None,
        vocab_size: int,
        device: torch.device,
    ) -> None:
        _check_resolved(params)
        params.verify_token_ids(vocab_size)
        self.params = params
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids = list(output_token_ids)
        # Outputs sampled but not in output_token_ids yet (overlapped steps: the last step's token
        # is still on the device); counted wherever only the number of outputs matters.
        self.num_unseen = 0
        self.is_greedy = params.is_greedy
        self.samplers = used_samplers(params, vocab_size)
        self.order = tuple(s for s in params.sampler_names if s in self.samplers)
        self.param_row = param_row(params)
        self.bad_words = params._bad_words_ids or []
        self.custom_bans = sorted(set(params._custom_ban_ids or []))
        self.breakers = params._dry_breaker_ids or []
        # Samplers that read the values of earlier outputs (not just their number).
        self.needs_history = bool(self.samplers & HISTORY_SAMPLERS) or any(
            len(w) > 1 for w in self.bad_words
        )
        stops = set(params.stop_token_ids)
        if eos_token_id is not None and not params.ignore_eos:
            stops.add(eos_token_id)
        self.min_tokens_bans = sorted(stops)
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=self.device)
        self.mirostat_mu = 2.0 * params.mirostat_tau

    @property
    def num_outputs(self) -> int:
        return len(self.output_token_ids) + self.num_unseen

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def step_bans(self) -> list[int]:
        """Tokens banned at this step: custom bans, single-token bad words, min_tokens stops."""
        bans = list(self.custom_bans) + [w[0] for w in self.bad_words if len(w) == 1]
        if self.num_outputs < self.params.min_tokens:
            bans += self.min_tokens_bans
        return bans

    def step_generator(self) -> torch.Generator:
        """The request's generator, reseeded from (seed, number of outputs so far)."""
        assert self.generator is not None and self.params.seed is not None
        self.generator.manual_seed(_mix_seed(self.params.seed, self.num_outputs))
        return self.generator


@dataclass
class SamplingMetadata:
    states: list[RequestSamplingState]  # one per row of logits, in batch order
    params: Tensor  # [rows, columns] float32: PARAM_COLUMNS, then mu and number of outputs
    greedy: Tensor  # [rows] bool
    all_greedy: bool
    # Per distinct sampler order: sampler name -> rows using it (None: every row).
    groups: list[tuple[tuple[str, ...], dict[str, Tensor | None]]]
    tail_rows: dict[str, Tensor | None]  # "mirostat", "skew", "xtc" rows of the whole batch
    history: Tensor | None  # [rows, max_len] long, right-aligned, -1 padded
    breakers: Tensor | None  # [rows, max_breakers] long, -2 padded
    bans: tuple[Tensor, Tensor] | None  # (row ids, token ids) set to -inf
    bad_words: tuple[Tensor, Tensor, Tensor] | None
    logit_bias: tuple[Tensor, Tensor, Tensor] | None  # (row ids, token ids, values)
    allowed: tuple[Tensor, Tensor] | None  # (row ids [A], mask [A, vocab] bool)
    num_logprobs: int | None  # largest N asked by a row; None when no row asks

    @classmethod
    def build(
        cls, states: list[RequestSamplingState], vocab_size: int, device: torch.device
    ) -> SamplingMetadata:
        rows = [s.param_row + (s.mirostat_mu, float(s.num_outputs)) for s in states]
        need_history = any(s.needs_history for s in states)
        asked = [s.params.logprobs for s in states if s.params.logprobs is not None]
        return cls(
            states=states,
            params=to_device(rows, device, torch.float32),  # [rows, columns]
            greedy=to_device([s.is_greedy for s in states], device, torch.bool),  # [rows]
            all_greedy=all(s.is_greedy for s in states),
            groups=_order_groups(states, device),
            tail_rows={n: _rows_using(states, n, device) for n in ("mirostat", "skew", "xtc")},
            history=_history(states, device) if need_history else None,
            breakers=_breakers(states, device),
            bans=sparse_bans([s.step_bans() for s in states], device),
            bad_words=bad_word_prefixes([s.bad_words for s in states], device),
            logit_bias=_logit_bias(states, device),
            allowed=_allowed(states, vocab_size, device),
            num_logprobs=max(asked) if asked else None,
        )

    def column(self, name: str, rows: Tensor | None) -> Tensor:
        values = self.params[:, COLUMN[name]]  # [rows]
        return values if rows is None else values.index_select(0, rows)


@dataclass
class SamplerOutput:
    sampled_token_ids: Tensor  # [num_rows] long
    logprobs: LogprobsTensors | None  # None when no row asked; N = max over rows


class Sampler(torch.nn.Module):
    """Applies each row's samplers and draws one token per row (see the module docstring)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.generator = generator  # for unseeded rows; None: torch's default generator

    def forward(self, logits: Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        md = metadata
        raw = logits.float()  # [rows, vocab]
        x = self.process_logits(raw, md)
        tokens = argmax_rows(x)  # [rows]
        if not md.all_greedy:
            drawn = self._draw(x, md)
            tokens = torch.where(md.greedy, tokens, drawn)
        _update_mirostat(x, tokens, md)
        logprobs = None
        if md.num_logprobs is not None:
            logprobs = gather_logprobs(raw.log_softmax(dim=-1), tokens, md.num_logprobs)
        return SamplerOutput(sampled_token_ids=tokens, logprobs=logprobs)

    def process_logits(self, logits: Tensor, md: SamplingMetadata) -> Tensor:
        """The logits after the bans and each row's samplers (all but skew), [rows, vocab]."""
        x = _apply_token_masks(logits.float(), md)
        coins = self._uniform_coins(md, x.device)  # [rows]
        for order, rows_for in md.groups:
            for name in order:
                if name in rows_for:
                    x = _apply_one(x, name, rows_for[name], md, coins)
        return _on_rows(
            x,
            md.tail_rows["mirostat"],
            lambda sub, r: shaping.apply_mirostat(sub, md.params[:, MU_COLUMN][_ix(r)]),
        )

    def _uniform_coins(self, md: SamplingMetadata, device: torch.device) -> Tensor | None:
        """One uniform per row for XTC's coin flip (seeded rows: from their own generator)."""
        if md.tail_rows["xtc"] is _SKIP:
            return None
        coins = torch.rand(len(md.states), device=device, generator=self.generator)  # [rows]
        for i, state in enumerate(md.states):
            if state.generator is not None and "xtc" in state.samplers:
                coins[i : i + 1].uniform_(generator=state.step_generator())
        return coins

    def _draw(self, x: Tensor, md: SamplingMetadata) -> Tensor:
        x = _on_rows(
            x, md.tail_rows["skew"], lambda sub, r: shaping.apply_skew(sub, md.column("skew", r))
        )
        probs = x.softmax(dim=-1)  # [rows, vocab]
        q = torch.empty_like(probs).exponential_(generator=self.generator)  # [rows, vocab]
        for i, state in enumerate(md.states):
            if state.generator is not None and not state.is_greedy:
                gen = state.generator if "xtc" in state.samplers else state.step_generator()
                q[i].exponential_(generator=gen)
        return argmax_rows(probs / q.clamp_(min=1e-20))  # [rows]


def compute_prompt_logprobs(
    logits: Tensor, target_token_ids: Tensor, num_top: int
) -> LogprobsTensors:
    """logits [n, vocab] of prompt positions; target_token_ids [n]: the next prompt token."""
    return gather_logprobs(logits.float().log_softmax(dim=-1), target_token_ids, num_top)


# ---- pipeline -----------------------------------------------------------------------------------

_Op = Callable[[Tensor, Tensor | None, SamplingMetadata, Tensor | None], Tensor]


def _ops() -> dict[str, _Op]:
    t, s, p = truncation, shaping, penalties

    def col(name: str) -> Callable[[SamplingMetadata, Tensor | None], Tensor]:
        return lambda md, r: md.column(name, r)

    def hist(md: SamplingMetadata, r: Tensor | None) -> Tensor:
        assert md.history is not None
        return md.history if r is None else md.history.index_select(0, r)

    def simple(fn: Callable[[Tensor, Tensor], Tensor], name: str) -> _Op:
        return lambda x, r, md, coins: fn(x, col(name)(md, r))

    return {
        "top_k": lambda x, r, md, c: t.apply_top_k(x, md.column("top_k", r).long()),
        "top_p": simple(t.apply_top_p, "top_p"),
        "top_a": simple(t.apply_top_a, "top_a"),
        "min_p": simple(t.apply_min_p, "min_p"),
        "tfs": simple(t.apply_tfs, "tfs"),
        "eta_cutoff": simple(t.apply_eta_cutoff, "eta_cutoff"),
        "epsilon_cutoff": simple(t.apply_epsilon_cutoff, "epsilon_cutoff"),
        "typical_p": simple(t.apply_typical_p, "typical_p"),
        "top_nsigma": simple(t.apply_top_nsigma, "nsigma"),
        "temperature": lambda x, r, md, c: s.apply_temperature(
            x,
            *(
                md.column(n, r)
                for n in ("temperature", "dynatemp_min", "dynatemp_max", "dynatemp_exponent")
            ),
        ),
        "quadratic": lambda x, r, md, c: s.apply_quadratic(
            x, md.column("smoothing_factor", r), md.column("smoothing_curve", r)
        ),
        "xtc": lambda x, r, md, c: s.apply_xtc(
            x, md.column("xtc_threshold", r), c[_ix(r)] < md.column("xtc_probability", r)
        ),
        "penalties": lambda x, r, md, c: p.apply_penalties(
            x,
            hist(md, r),
            md.params[:, NUM_OUTPUT_COLUMN][_ix(r)].long(),
            *(
                md.column(n, r)
                for n in ("presence_penalty", "frequency_penalty", "repetition_penalty")
            ),
            md.column("repetition_penalty_range", r).long(),
        ),
        "no_repeat_ngram": lambda x, r, md, c: p.apply_no_repeat_ngram(
            x, hist(md, r), md.column("no_repeat_ngram_size", r).long()
        ),
        "dry": lambda x, r, md, c: p.apply_dry(
            x,
            hist(md, r),
            _select(md.breakers, r),
            md.column("dry_multiplier", r),
            md.column("dry_base", r),
            md.column("dry_allowed_length", r).long(),
            md.column("dry_range", r).long(),
        ),
    }


_OPS = _ops()


def _apply_one(
    x: Tensor, name: str, rows: Tensor | None, md: SamplingMetadata, coins: Tensor | None
) -> Tensor:
    op = _OPS[name]
    return _on_rows(x, rows, lambda sub, r: op(sub, r, md, coins))


def _on_rows(
    x: Tensor, rows: Tensor | None | object, fn: Callable[[Tensor, Tensor | None], Tensor]
) -> Tensor:
    """Apply fn to the given rows only (None: all rows); a missing entry is skipped by callers."""
    if rows is _SKIP:
        return x
    if rows is None:
        return fn(x, None)
    assert isinstance(rows, Tensor)
    return x.index_copy(0, rows, fn(x.index_select(0, rows), rows))


_SKIP = object()


def _ix(rows: Tensor | None) -> slice | Tensor:
    return slice(None) if rows is None else rows


def _select(t: Tensor | None, rows: Tensor | None) -> Tensor:
    assert t is not None
    return t if rows is None else t.index_select(0, rows)


def _apply_token_masks(x: Tensor, md: SamplingMetadata) -> Tensor:
    if md.logit_bias is not None:
        rows, cols, values = md.logit_bias
        x = x.index_put((rows, cols), values, accumulate=True)
    if md.allowed is not None:
        rows, mask = md.allowed
        x = x.index_copy(0, rows, x.index_select(0, rows).masked_fill(~mask, float("-inf")))
    if md.bans is not None:
        x = x.index_put(md.bans, torch.tensor(float("-inf"), device=x.device))
    if md.bad_words is not None:
        assert md.history is not None
        x = ban_bad_words(x, md.history, md.bad_words)
    return x


def _update_mirostat(x: Tensor, tokens: Tensor, md: SamplingMetadata) -> None:
    rows = md.tail_rows["mirostat"]
    if rows is _SKIP:
        return
    ix = _ix(rows)
    mu = shaping.mirostat_update(
        x[ix],
        tokens[ix],
        md.params[ix, MU_COLUMN],
        md.column("mirostat_tau", rows),
        md.column("mirostat_eta", rows),
    )
    indices = range(len(md.states)) if rows is None else rows.tolist()
    for i, value in zip(indices, mu.tolist(), strict=True):
        md.states[i].mirostat_mu = value


# ---- building ----------------------------------------------------------------------------------


def _rows_using(
    states: list[RequestSamplingState],
    name: str,
    device: torch.device,
    among: Sequence[int] | None = None,
) -> Tensor | None | object:
    candidates = range(len(states)) if among is None else among
    rows = [i for i in candidates if name in states[i].samplers]
    if not rows:
        return _SKIP
    if len(rows) == len(states):
        return None
    return to_device(rows, device, torch.long)  # [num_rows_using]


def _order_groups(
    states: list[RequestSamplingState], device: torch.device
) -> list[tuple[tuple[str, ...], dict[str, Tensor | None]]]:
    by_order: dict[tuple[str, ...], list[int]] = {}
    for i, state in enumerate(states):
        by_order.setdefault(state.order, []).append(i)
    groups = []
    for order, members in by_order.items():
        rows_for = {}
        for name in order:
            rows = _rows_using(states, name, device, members)
            if rows is not _SKIP:
                rows_for[name] = rows
        groups.append((order, rows_for))
    return groups


def _history(states: list[RequestSamplingState], device: torch.device) -> Tensor:
    seqs = [s.prompt_token_ids + s.output_token_ids if s.needs_history else [] for s in states]
    return to_device(right_aligned(seqs, pad=-1), device)  # [rows, max_len]


def _breakers(states: list[RequestSamplingState], device: torch.device) -> Tensor | None:
    if not any("dry" in s.samplers for s in states):
        return None
    return to_device(right_aligned([s.breakers for s in states], pad=-2), device)  # [rows, B]


def _logit_bias(
    states: list[RequestSamplingState], device: torch.device
) -> tuple[Tensor, Tensor, Tensor] | None:
    entries = [
        (i, t, v) for i, s in enumerate(states) for t, v in (s.params.logit_bias or {}).items()
    ]
    if not entries:
        return None
    rows, cols, values = zip(*entries, strict=True)
    return (
        to_device(rows, device, torch.long),
        to_device(cols, device, torch.long),
        to_device(values, device, torch.float32),
    )  # [num_entries] each


def _allowed(
    states: list[RequestSamplingState], vocab_size: int, device: torch.device
) -> tuple[Tensor, Tensor] | None:
    rows = [i for i, s in enumerate(states) if s.params.allowed_token_ids is not None]
    if not rows:
        return None
    mask = torch.zeros(len(rows), vocab_size, dtype=torch.bool)  # [A, vocab]
    for j, i in enumerate(rows):
        mask[j, torch.tensor(states[i].params.allowed_token_ids, dtype=torch.long)] = True
    return to_device(rows, device, torch.long), to_device(mask, device)


def _check_resolved(params: SamplingParams) -> None:
    if params._bad_words_ids is None:
        raise ValueError(
            f"bad_words={params.bad_words!r} is invalid here: token ids were not "
            "resolved (SamplingParams.resolve_token_ids needs a tokenizer)"
        )
    if params._custom_ban_ids is None:
        raise ValueError(
            f"custom_token_bans={params.custom_token_bans!r} is invalid here: "
            "strings were not resolved (resolve_token_ids needs a tokenizer)"
        )
    if params._dry_breaker_ids is None:
        raise ValueError(
            f"dry_sequence_breakers={params.dry_sequence_breakers!r} is invalid "
            "here: not resolved (resolve_token_ids needs a tokenizer)"
        )


def _mix_seed(seed: int, step: int) -> int:
    """splitmix64 of (seed, step): a well-spread 63-bit seed per step of a request."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)
