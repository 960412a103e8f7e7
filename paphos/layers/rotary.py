"""Rotary position embeddings: a cos/sin table built once (default, linear, llama3, yarn,
LongRoPE, dynamic NTK and Gemma 4's proportional scaling, or llama.cpp's per-dimension frequency
factors, its form of llama3 scaling in GGUF files).
Yarn also scales the table by its attention factor, as transformers scales cos and sin."""

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
        build_table = _TABLE_BUILDERS.get(_rope_type(rope_scaling))
        if build_table is not None:
            assert rope_scaling is not None and freq_factors is None
            cache = build_table(base, rotary_dim, max_position, rope_scaling)
            self.register_buffer("cos_sin_cache", cache, persistent=False)
            self._op = pick("rotary_embedding", cache.device.type)
            return
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
        cache = cache * _attention_factor(rope_scaling)
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


# ---- LongRoPE and dynamic NTK: scalings that build the whole table (per-position factors) ----


def _default_inv_freq(base: float, rotary_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    return 1.0 / (base**exponents)  # [rotary_dim // 2]


def _table(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """cos | sin of positions x inv_freq ([rotary_dim // 2], or one row per position), scaled."""
    if inv_freq.dim() == 1:
        freqs = torch.outer(positions, inv_freq)  # [num_positions, rotary_dim // 2]
    else:
        freqs = positions[:, None] * inv_freq  # [num_positions, rotary_dim // 2]
    return torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)  # [num_pos, rotary_dim]


def longrope_table(
    base: float, rotary_dim: int, max_position: int, scaling: dict[str, Any]
) -> torch.Tensor:
    """Phi-3's LongRoPE ("su"): per-dimension factors, `short_factor` for positions within the
    pretrained context and `long_factor` beyond it; cos and sin scaled by the attention factor.
    (HF picks one factor set per forward by the batch's length; per position, a cached key keeps
    the rotation it was written with.)"""
    original = int(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor") or max_position / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        )
    inv_freq = _default_inv_freq(base, rotary_dim)
    tables = []
    for key, start, stop in (
        ("short_factor", 0, original),
        ("long_factor", original, max_position),
    ):
        if stop <= start:
            continue
        ext = torch.tensor(scaling[key], dtype=torch.float32)  # [rotary_dim // 2]
        if ext.shape != inv_freq.shape:
            raise ValueError(f"longrope {key}: {ext.numel()} values, expected {inv_freq.numel()}")
        positions = torch.arange(start, stop, dtype=torch.float32)
        tables.append(_table(positions, inv_freq / ext, float(attention_factor)))
    return torch.cat(tables)  # [max(max_position, original), rotary_dim]


def dynamic_ntk_table(
    base: float, rotary_dim: int, max_position: int, scaling: dict[str, Any]
) -> torch.Tensor:
    """Dynamic NTK: unscaled within `max_position`; position p beyond it rotates with the base HF
    uses for a sequence of p + 1 tokens (what HF's cached decode gives that token). The table
    covers factor x max_position."""
    factor = float(scaling["factor"])
    inside = _table(
        torch.arange(max_position, dtype=torch.float32), _default_inv_freq(base, rotary_dim)
    )
    beyond = torch.arange(max_position, int(max_position * factor), dtype=torch.float32)
    if beyond.numel() == 0:
        return inside
    seq_len = beyond + 1  # [num_beyond]
    scaled_base = base * ((factor * seq_len / max_position) - (factor - 1)) ** (
        rotary_dim / (rotary_dim - 2)
    )  # [num_beyond]
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    inv_freq = 1.0 / scaled_base[:, None] ** exponents  # [num_beyond, rotary_dim // 2]
    return torch.cat((inside, _table(beyond, inv_freq)))


def proportional_table(
    base: float, rotary_dim: int, max_position: int, scaling: dict[str, Any]
) -> torch.Tensor:
    """Gemma 4's proportional rope: over the whole head (rotary_dim = head_dim, halves paired
    as neox), only the first partial_rotary_factor of the frequencies turn (exponents over the
    whole head_dim); the others are 0, so those dimensions stay as they are."""
    num_turning = int(float(scaling.get("partial_rotary_factor", 1.0)) * rotary_dim // 2)
    exponents = torch.arange(0, 2 * num_turning, 2, dtype=torch.float32) / rotary_dim
    inv_freq = torch.zeros(rotary_dim // 2)  # [rotary_dim // 2]
    inv_freq[:num_turning] = 1.0 / base**exponents
    inv_freq /= float(scaling.get("factor", 1.0))
    return _table(torch.arange(max_position, dtype=torch.float32), inv_freq)


_TABLE_BUILDERS = {
    "longrope": longrope_table,
    "su": longrope_table,
    "dynamic": dynamic_ntk_table,
    "proportional": proportional_table,
}


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
    if kind == "yarn":
        return _yarn_inv_freq(base, rotary_dim, rope_scaling)
    raise ValueError(f"rope scaling type {kind!r} is not supported (default, linear, llama3, yarn)")


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


def _yarn_factor(scaling: dict[str, Any]) -> float:
    factor = scaling.get("factor")
    if factor is None:
        return (
            float(scaling["max_position_embeddings"]) / scaling["original_max_position_embeddings"]
        )
    return float(factor)


def _attention_factor(rope_scaling: dict[str, Any] | None) -> float:
    """Yarn's scale of cos and sin (its `attention_factor`, else one derived from mscale)."""
    if _rope_type(rope_scaling) != "yarn":
        return 1.0
    assert rope_scaling is not None
    if rope_scaling.get("attention_factor") is not None:
        return float(rope_scaling["attention_factor"])
    factor = _yarn_factor(rope_scaling)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
    return mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)


def _yarn_inv_freq(base: float, dim: int, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN: frequencies interpolated by `factor` below the beta_slow..beta_fast band of
    rotations over the original context, kept above it, ramped linearly in between."""
    factor = _yarn_factor(scaling)
    old_context = float(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # [dim // 2]
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
