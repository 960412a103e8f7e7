"""Rotary position embeddings: a cos/sin table built once (default, linear and llama3 scaling, or
llama.cpp's per-dimension frequency factors, its form of llama3 scaling in GGUF files)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from paphos.ops.registry import pick


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_size: int,
        rotary_dim: int,
        max_position: int,
        base: float,
        is_neox_style: bool = True,
        rope_scaling: dict[str, Any] | None = None,
        freq_factors: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.head_size = head_size
        self.is_neox_style = is_neox_style
        inv_freq = _inv_freq(base, rotary_dim, rope_scaling)  # [rotary_dim // 2]
        if freq_factors is not None:
            if len(freq_factors) != rotary_dim // 2:
                raise ValueError(
                    f"rope frequency factors: {len(freq_factors)} values for a rotary dimension "
                    f"of {rotary_dim} (expected {rotary_dim // 2})"
                )
            inv_freq = inv_freq / torch.tensor(freq_factors, dtype=torch.float32)  # [dim // 2]
        max_position = int(max_position * _position_factor(rope_scaling))
        t = torch.arange(max_position, dtype=torch.float32)  # [max_position]
        freqs = torch.outer(t, inv_freq)  # [max_position, rotary_dim // 2]
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [max_position, rotary_dim]
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self._op = pick("rotary_embedding", cache.device.type)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._op(
            positions, query, key, self.cos_sin_cache, self.head_size, self.is_neox_style
        )


def get_rope(
    head_size: int,
    rotary_dim: int,
    max_position: int,
    base: float,
    rope_scaling: dict[str, Any] | None = None,
    is_neox_style: bool = True,
    freq_factors: list[float] | None = None,
) -> RotaryEmbedding:
    """`freq_factors` (llama.cpp's rope_freqs) divide the frequencies after any scaling."""
    return RotaryEmbedding(
        head_size, rotary_dim, max_position, base, is_neox_style, rope_scaling, freq_factors
    )


def _rope_type(rope_scaling: dict[str, Any] | None) -> str:
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def _position_factor(rope_scaling: dict[str, Any] | None) -> float:
    """Linear scaling stretches positions, so the table must cover factor x more of them."""
    return float(rope_scaling["factor"]) if _rope_type(rope_scaling) == "linear" else 1.0


def _inv_freq(base: float, rotary_dim: int, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    inv_freq = 1.0 / (base**exponents)  # [rotary_dim // 2]
    kind = _rope_type(rope_scaling)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    raise ValueError(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths scaled down by `factor`, short ones kept, a smooth blend
    between."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, blended)
    return torch.where(wavelen < high_freq_wavelen, inv_freq, out)
