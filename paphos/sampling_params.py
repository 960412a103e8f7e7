"""Per-request generation settings, validated at the edge (ValueError naming the field).

Field names follow Aphrodite so that existing clients (SillyTavern, Kobold frontends) work. A
default `SamplingParams()` turns every sampler off. The engine reads the stopping fields
(max_tokens, min_tokens, stop, stop_token_ids, ignore_eos); the sampler (`paphos.layers.sampler`)
reads the rest, and only token ids: strings become ids once, in `resolve_token_ids(tokenizer)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

# Samplers whose place in the pipeline can be chosen (`sampler_priority`), in Aphrodite's default
# order. Skew and mirostat always come last (they act on the final distribution).
DEFAULT_SAMPLER_ORDER: tuple[str, ...] = (
    "dry",
    "penalties",
    "no_repeat_ngram",
    "temperature",
    "top_nsigma",
    "top_k",
    "top_p",
    "top_a",
    "min_p",
    "tfs",
    "eta_cutoff",
    "epsilon_cutoff",
    "typical_p",
    "quadratic",
    "xtc",
)
# Kobold-compatible integer ids (0-6 as KoboldAI), then Aphrodite's (7-13), then min_p.
SAMPLER_IDS: dict[int, str] = {
    0: "top_k",
    1: "top_a",
    2: "top_p",
    3: "tfs",
    4: "typical_p",
    5: "temperature",
    6: "penalties",
    7: "dry",
    8: "no_repeat_ngram",
    9: "top_nsigma",
    10: "eta_cutoff",
    11: "epsilon_cutoff",
    12: "quadratic",
    13: "xtc",
    14: "min_p",
}
# Other accepted names (case-insensitive); "top_p_top_k" is Aphrodite's combined step.
SAMPLER_ALIASES: dict[str, tuple[str, ...]] = {
    "top_p_top_k": ("top_k", "top_p"),
    "repetition_penalty": ("penalties",),
    "rep_pen": ("penalties",),
    "typical": ("typical_p",),
    "temp": ("temperature",),
    "nsigma": ("top_nsigma",),
    "eta": ("eta_cutoff",),
    "epsilon": ("epsilon_cutoff",),
    "smoothing": ("quadratic",),
    "quadratic_sampling": ("quadratic",),
    "no_repeat_ngram_size": ("no_repeat_ngram",),
}
DEFAULT_DRY_SEQUENCE_BREAKERS: tuple[str, ...] = ("\n", ":", '"', "*")
# The kinds of constraint a request may give in `structured_outputs` (vLLM's names).
STRUCTURED_OUTPUT_KINDS: tuple[str, ...] = (
    "json",
    "regex",
    "choice",
    "grammar",
    "json_object",
    "structural_tag",
)


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One constraint on a request's output (exactly one kind is set), enforced by xgrammar.

    json: a JSON schema (dict or its text); regex; choice: the output is one of these strings;
    grammar: EBNF/GBNF with a `root` rule; json_object: any JSON object; structural_tag: xgrammar's
    structural tag (dict or its text). JSON whitespace is bounded (no runs of free whitespace)
    unless `any_whitespace`. `reasoning_end_token_id`: the constraint starts after this token (set
    by the server's reasoning parser: the thinking before it is free).
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict[str, Any] | str | None = None
    any_whitespace: bool = False
    reasoning_end_token_id: int | None = None

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs={self.describe()} is invalid: expected exactly one of "
                f"{list(STRUCTURED_OUTPUT_KINDS)}, got {given or 'none'}"
            )
        if self.choice is not None:
            ok = bool(self.choice) and all(isinstance(c, str) and c for c in self.choice)
            _require(ok, "structured_outputs.choice", self.choice, "a list of non-empty strings")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None:
                _require(
                    isinstance(value, str) and bool(value),
                    f"structured_outputs.{name}",
                    value,
                    "a non-empty string",
                )

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_OUTPUT_KINDS if getattr(self, k) not in (None, False))

    def describe(self) -> str:
        """A short text of the constraint for error messages."""
        fields = {k: getattr(self, k) for k in STRUCTURED_OUTPUT_KINDS}
        text = repr({k: v for k, v in fields.items() if v not in (None, False)})
        return text if len(text) < 120 else text[:117] + "..."

    @classmethod
    def from_any(cls, value: Any) -> StructuredOutputsParams:
        """From an instance or a dict of its fields (an unknown key is a ValueError)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(
                f"structured_outputs={value!r} is invalid: expected an object with one of "
                f"{list(STRUCTURED_OUTPUT_KINDS)}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"structured_outputs={value!r} is invalid: unknown field(s) {unknown}; "
                f"expected one of {list(STRUCTURED_OUTPUT_KINDS)}"
            )
        try:
            return cls(**value)
        except TypeError as e:
            raise ValueError(f"structured_outputs={value!r} is invalid: {e}") from e


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    seed: int | None = None
    temperature: float = 1.0  # 0: greedy
    dynatemp_min: float = 0.0  # dynamic temperature is on when min or max is non-zero
    dynatemp_max: float = 0.0
    dynatemp_exponent: float = 1.0
    temperature_last: bool = False
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_a: float = 0.0
    min_p: float = 0.0
    tfs: float = 1.0
    eta_cutoff: float = 0.0  # in units of 1e-4
    epsilon_cutoff: float = 0.0  # in units of 1e-4
    typical_p: float = 1.0
    smoothing_factor: float = 0.0
    smoothing_curve: float = 1.0
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0
    nsigma: float = 0.0
    skew: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    repetition_penalty_range: int = 0  # last N tokens of prompt + output; 0: all of them
    no_repeat_ngram_size: int = 0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_sequence_breakers: list[str] = field(
        default_factory=lambda: list(DEFAULT_DRY_SEQUENCE_BREAKERS)
    )
    dry_sequence_breaker_ids: list[int] = field(default_factory=list)
    dry_range: int = 0  # last N tokens of prompt + output; 0: all of them
    mirostat_mode: int = 0  # 0: off, 2: Mirostat v2
    mirostat_tau: float = 0.0
    mirostat_eta: float = 0.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = field(default_factory=list)
    custom_token_bans: list[int | str] = field(default_factory=list)
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs besides the sampled token
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    sampler_priority: list[int | str] | None = None
    sampler_order: list[int | str] | None = None  # alias of sampler_priority (Kobold's name)
    # A grammar the output must follow (paphos.structured compiles it with xgrammar).
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None
    # Filled by `resolve_token_ids`; init fields so that `dataclasses.replace` keeps them.
    _bad_words_ids: list[list[int]] | None = field(default=None, repr=False, compare=False)
    _dry_breaker_ids: list[int] | None = field(default=None, repr=False, compare=False)
    _custom_ban_ids: list[int] | None = field(default=None, repr=False, compare=False)
    # The compiled grammar of structured_outputs (xgrammar's, set by the engine; not pickled:
    # another process compiles its own from structured_outputs).
    _grammar: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.bad_words = list(self.bad_words or [])
        self.custom_token_bans = _parse_custom_bans(self.custom_token_bans)
        self.dry_sequence_breakers = list(self.dry_sequence_breakers or [])
        self.dry_sequence_breaker_ids = list(self.dry_sequence_breaker_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.seed == -1:
            self.seed = None
        if self.logit_bias is not None:
            self.logit_bias = _parse_logit_bias(self.logit_bias)
        self._merge_sampler_order()
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_any(self.structured_outputs)
        self.validate()
        if not any(isinstance(t, str) for t in self.custom_token_bans):
            self._custom_ban_ids = [int(t) for t in self.custom_token_bans]
        if not self.bad_words:
            self._bad_words_ids = []
        if not self.dry_sequence_breakers or self.dry_multiplier == 0:
            self._dry_breaker_ids = list(self.dry_sequence_breaker_ids)

    def _merge_sampler_order(self) -> None:
        if self.sampler_order is not None:
            if self.sampler_priority is not None and self.sampler_priority != self.sampler_order:
                raise ValueError(
                    f"sampler_order={self.sampler_order!r} is invalid: it is an alias of "
                    f"sampler_priority={self.sampler_priority!r}; give only one"
                )
            self.sampler_priority = list(self.sampler_order)
            self.sampler_order = None
        if self.sampler_priority is not None and len(self.sampler_priority) == 0:
            self.sampler_priority = None

    def validate(self) -> None:
        self._validate_basics()
        self._validate_truncation()
        self._validate_penalties()
        self._validate_token_lists()

    def _validate_basics(self) -> None:
        _require(self.n >= 1, "n", self.n, ">= 1")
        if self.best_of is not None:
            _require(self.best_of >= self.n, "best_of", self.best_of, f">= n ({self.n})")
        _finite_at_least("temperature", self.temperature, 0.0)
        _finite_at_least("dynatemp_min", self.dynatemp_min, 0.0)
        _finite_at_least("dynatemp_max", self.dynatemp_max, 0.0)
        _finite_at_least("dynatemp_exponent", self.dynatemp_exponent, 0.0)
        if self.max_tokens is not None:
            _require(self.max_tokens >= 1, "max_tokens", self.max_tokens, ">= 1")
        _require(self.min_tokens >= 0, "min_tokens", self.min_tokens, ">= 0")
        if self.max_tokens is not None:
            _require(
                self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens, "<= max_tokens"
            )
        if self.logprobs is not None:
            _require(self.logprobs >= 0, "logprobs", self.logprobs, ">= 0")
        if self.prompt_logprobs is not None:
            _require(self.prompt_logprobs >= 0, "prompt_logprobs", self.prompt_logprobs, ">= 0")
        _require(
            all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "non-empty strings"
        )
        _require(self.mirostat_mode in (0, 2), "mirostat_mode", self.mirostat_mode, "0 or 2")
        _finite_at_least("mirostat_tau", self.mirostat_tau, 0.0)
        _finite_at_least("mirostat_eta", self.mirostat_eta, 0.0)
        if self.sampler_priority is not None:
            parse_sampler_priority(self.sampler_priority)
        if self.structured_outputs is not None and self.min_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens} is invalid with structured_outputs: the grammar "
                "decides where the output ends (EOS is allowed exactly when it is complete)"
            )

    def _validate_truncation(self) -> None:
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _require(self.top_k >= 0, "top_k", self.top_k, ">= 0 (or -1 for off)")
        _finite_at_least("top_a", self.top_a, 0.0)
        _require(0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        _require(0 < self.tfs <= 1, "tfs", self.tfs, "in (0, 1]")
        _finite_at_least("eta_cutoff", self.eta_cutoff, 0.0)
        _require(
            0 <= self.epsilon_cutoff <= 1000, "epsilon_cutoff", self.epsilon_cutoff, "in [0, 1000]"
        )
        _require(0 < self.typical_p <= 1, "typical_p", self.typical_p, "in (0, 1]")
        _finite_at_least("smoothing_factor", self.smoothing_factor, 0.0)
        _require(
            math.isfinite(self.smoothing_curve), "smoothing_curve", self.smoothing_curve, "finite"
        )
        _require(0 <= self.xtc_threshold <= 1, "xtc_threshold", self.xtc_threshold, "in [0, 1]")
        _require(
            0 <= self.xtc_probability <= 1, "xtc_probability", self.xtc_probability, "in [0, 1]"
        )
        _finite_at_least("nsigma", self.nsigma, 0.0)
        _require(math.isfinite(self.skew), "skew", self.skew, "finite")

    def _validate_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(-2 <= value <= 2, name, value, "in [-2, 2]")
        rep = self.repetition_penalty
        _require(math.isfinite(rep) and rep > 0, "repetition_penalty", rep, "> 0 (1: off)")
        _require(
            self.repetition_penalty_range >= 0,
            "repetition_penalty_range",
            self.repetition_penalty_range,
            ">= 0 (0: whole sequence)",
        )
        _require(
            self.no_repeat_ngram_size >= 0,
            "no_repeat_ngram_size",
            self.no_repeat_ngram_size,
            ">= 0",
        )
        _finite_at_least("dry_multiplier", self.dry_multiplier, 0.0)
        _require(
            math.isfinite(self.dry_base) and self.dry_base > 1, "dry_base", self.dry_base, "> 1"
        )
        _require(
            self.dry_allowed_length >= 1, "dry_allowed_length", self.dry_allowed_length, ">= 1"
        )
        _require(self.dry_range >= 0, "dry_range", self.dry_range, ">= 0 (0: whole sequence)")
        _require(
            all(isinstance(s, str) and s for s in self.dry_sequence_breakers),
            "dry_sequence_breakers",
            self.dry_sequence_breakers,
            "non-empty strings",
        )

    def _validate_token_lists(self) -> None:
        for name in ("stop_token_ids", "dry_sequence_breaker_ids"):
            _require_token_ids(name, getattr(self, name))
        if self.allowed_token_ids is not None:
            _require_token_ids("allowed_token_ids", self.allowed_token_ids)
            _require(
                len(self.allowed_token_ids) > 0,
                "allowed_token_ids",
                self.allowed_token_ids,
                "a non-empty list (or None)",
            )
        _require(
            all(isinstance(w, str) and w for w in self.bad_words),
            "bad_words",
            self.bad_words,
            "non-empty strings",
        )
        for ban in self.custom_token_bans:
            ok = (isinstance(ban, str) and ban) or (isinstance(ban, int) and ban >= 0)
            _require(
                bool(ok),
                "custom_token_bans",
                self.custom_token_bans,
                "token ids >= 0 or non-empty strings",
            )
        for name in ("_custom_ban_ids", "_dry_breaker_ids"):
            if getattr(self, name) is not None:
                _require_token_ids(name, getattr(self, name))
        for ids in self._bad_words_ids or []:
            _require_token_ids("_bad_words_ids", ids)

    # ---- token ids -----------------------------------------------------------------------------

    def resolve_token_ids(self, tokenizer: Any | None) -> None:
        """Turn bad_words, dry_sequence_breakers and string custom_token_bans into token ids.

        Called once by the engine in add_request. Without a tokenizer, a string field that is in
        use raises ValueError.
        """
        if tokenizer is None:
            if self._bad_words_ids is None:
                raise ValueError(f"bad_words={self.bad_words!r} is invalid: needs a tokenizer")
            if self._custom_ban_ids is None:
                raise ValueError(
                    f"custom_token_bans={self.custom_token_bans!r} is invalid: strings need a "
                    "tokenizer (give token ids)"
                )
            if self._dry_breaker_ids is None:
                raise ValueError(
                    f"dry_sequence_breakers={self.dry_sequence_breakers!r} is invalid: needs a "
                    "tokenizer (give dry_sequence_breaker_ids and dry_sequence_breakers=[])"
                )
            return
        self._bad_words_ids = _bad_words_to_ids(tokenizer, self.bad_words)
        self._custom_ban_ids = sorted(
            {t for ban in self.custom_token_bans for t in _ban_to_ids(tokenizer, ban)}
        )
        breakers = {_encode(tokenizer, "a" + s)[-1] for s in self.dry_sequence_breakers}
        self._dry_breaker_ids = sorted(breakers | set(self.dry_sequence_breaker_ids))

    def verify_token_ids(self, vocab_size: int) -> None:
        """Raise ValueError if a token id given by the user is outside the vocabulary."""
        lists: dict[str, Sequence[int]] = {
            "stop_token_ids": self.stop_token_ids,
            "allowed_token_ids": self.allowed_token_ids or [],
            "logit_bias": list(self.logit_bias or {}),
            "custom_token_bans": self._custom_ban_ids or [],
            "dry_sequence_breaker_ids": self.dry_sequence_breaker_ids,
        }
        for name, ids in lists.items():
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(
                    f"{name} holds token ids {bad!r} outside the vocabulary (size {vocab_size})"
                )

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 and self.dynatemp_min == 0 and self.dynatemp_max == 0

    @property
    def samples_on_device_alone(self) -> bool:
        """Whether each token can be drawn on the device from the logits, the seed and the number
        of outputs so far: no sampler reads earlier tokens' values (penalties, DRY, n-gram and
        multi-token bad-word bans) or keeps host state (Mirostat), and no logprobs are returned.
        Such requests may run several decode steps per scheduling step (num_scheduler_steps)
        once min_tokens is reached."""
        return (
            self.presence_penalty == 0
            and self.frequency_penalty == 0
            and self.repetition_penalty == 1
            and self.no_repeat_ngram_size == 0
            and self.dry_multiplier == 0
            and self.mirostat_mode != 2
            and self.logprobs is None
            and self.prompt_logprobs is None
            and all(len(word) == 1 for word in self._bad_words_ids or ())
            and self.structured_outputs is None  # its matcher reads every sampled token
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_grammar"] = None  # xgrammar's compiled grammars do not pickle
        return state

    @property
    def sampler_names(self) -> tuple[str, ...]:
        """The orderable samplers in the order this request applies them."""
        if self.sampler_priority is not None:
            return parse_sampler_priority(self.sampler_priority)
        if self.temperature_last:
            order = [s for s in DEFAULT_SAMPLER_ORDER if s != "temperature"]
            return (*order, "temperature")
        return DEFAULT_SAMPLER_ORDER


def parse_sampler_priority(priority: Sequence[int | str]) -> tuple[str, ...]:
    """Canonical sampler names from names or Kobold-compatible ints; unlisted samplers follow in
    the default order. Raises ValueError on unknown or repeated entries."""
    names: list[str] = []
    for entry in priority:
        for name in _sampler_entry(entry):
            if name in names:
                raise ValueError(
                    f"sampler_priority={list(priority)!r} is invalid: {name!r} repeats"
                )
            names.append(name)
    return (*names, *(s for s in DEFAULT_SAMPLER_ORDER if s not in names))


def _sampler_entry(entry: int | str) -> tuple[str, ...]:
    if isinstance(entry, bool) or not isinstance(entry, (int, str)):
        raise ValueError(f"sampler_priority entry {entry!r} is invalid: expected a name or an int")
    if isinstance(entry, str) and entry.strip().lstrip("-").isdigit():
        entry = int(entry)
    if isinstance(entry, int):
        if entry not in SAMPLER_IDS:
            raise ValueError(
                f"sampler_priority entry {entry!r} is invalid: "
                f"expected one of {sorted(SAMPLER_IDS)}"
            )
        return (SAMPLER_IDS[entry],)
    key = entry.strip().lower()
    if key in DEFAULT_SAMPLER_ORDER:
        return (key,)
    if key in SAMPLER_ALIASES:
        return SAMPLER_ALIASES[key]
    known = sorted({*DEFAULT_SAMPLER_ORDER, *SAMPLER_ALIASES})
    raise ValueError(f"sampler_priority entry {entry!r} is invalid: expected one of {known}")


def _parse_logit_bias(bias: dict[Any, Any]) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in dict(bias).items():
        try:
            token = int(key)
            amount = float(value)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"logit_bias entry {key!r}: {value!r} is invalid: expected token id -> number"
            ) from e
        _require(token >= 0, "logit_bias", key, "token ids >= 0")
        _require(-100 <= amount <= 100, "logit_bias", value, "values in [-100, 100]")
        out[token] = amount
    return out


def _parse_custom_bans(bans: Any) -> list[int | str]:
    """Token ids, digit strings ("123") or a comma-separated string of them (ooba's form)."""
    if isinstance(bans, str):
        bans = [b for b in bans.split(",") if b.strip()] if "," in bans else [bans]
    out: list[int | str] = []
    for ban in bans or []:
        is_digits = isinstance(ban, str) and ban.strip().isdigit()
        out.append(int(ban) if is_digits else ban)
    return out


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _bad_words_to_ids(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """Each bad word as it would appear at the start of the text and after a space."""
    out: list[list[int]] = []
    for word in words:
        for variant in (word.lstrip(), " " + word.lstrip()):
            ids = _encode(tokenizer, variant)
            if ids and ids not in out:
                out.append(ids)
    return out


def _ban_to_ids(tokenizer: Any, ban: int | str) -> list[int]:
    return [ban] if isinstance(ban, int) else _encode(tokenizer, ban)


def _require_token_ids(name: str, ids: Sequence[Any]) -> None:
    ok = all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
    _require(ok, name, list(ids), "token ids >= 0")


def _finite_at_least(name: str, value: float, low: float) -> None:
    _require(math.isfinite(value) and value >= low, name, value, f"finite and >= {low}")


def _require(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")
