"""Per-request generation settings, validated at the edge (ValueError naming the field).

The engine reads the stopping fields (max_tokens, min_tokens, stop, stop_token_ids, ignore_eos); the
sampler (`paphos.layers.sampler`) reads the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    seed: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        _require(self.n >= 1, "n", self.n, ">= 1")
        if self.best_of is not None:
            _require(self.best_of >= self.n, "best_of", self.best_of, f">= n ({self.n})")
        _require(self.temperature >= 0, "temperature", self.temperature, ">= 0")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _require(self.top_k >= 0, "top_k", self.top_k, ">= 0 (or -1 for off)")
        _require(0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
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
        _require(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "non-empty strings")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def _require(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")
