"""paphos's rotary tables equal transformers' rotary embeddings for the scalings built as whole
tables: yarn, LongRoPE (short factors inside the pretrained context, long beyond) and dynamic NTK
(unscaled inside max_position_embeddings, the base HF uses for p + 1 tokens at position p)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from paphos.layers.rotary import get_rope
from paphos.models.llama import rope_settings

HEAD_DIM, MAX_POS = 16, 64


def _hf_cos_sin(config: LlamaConfig, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's cos and sin [len(positions), HEAD_DIM // 2] for one forward over these positions."""
    rope = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, len(positions), HEAD_DIM)
    cos, sin = rope(x, torch.tensor([positions]))
    return cos[0, :, : HEAD_DIM // 2], sin[0, :, : HEAD_DIM // 2]


def _ours(config: LlamaConfig) -> torch.Tensor:
    theta, scaling = rope_settings(config)
    return get_rope(HEAD_DIM, HEAD_DIM, MAX_POS, theta, scaling).cos_sin_cache


def _config(rope_parameters: dict) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POS,
        rope_parameters={"rope_theta": 10000.0, **rope_parameters},
    )


@pytest.mark.parametrize(
    "params",
    [
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
        dict(
            rope_type="yarn",
            factor=8.0,
            original_max_position_embeddings=8,
            beta_fast=16,
            beta_slow=2,
            mscale=1.0,
            mscale_all_dim=0.5,
        ),  # fmt: skip
    ],
)
def test_yarn_table_equals_transformers(params):
    config = _config(params)
    cos, sin = _hf_cos_sin(config, list(range(MAX_POS)))
    table = _ours(config)
    torch.testing.assert_close(table[:, : HEAD_DIM // 2], cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(table[:, HEAD_DIM // 2 :], sin, atol=1e-5, rtol=1e-5)


def test_longrope_table_uses_short_factors_inside_and_long_beyond_the_pretrained_context():
    short, long = [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0], [2.0, 3, 4, 5, 6, 7, 8, 9]
    config = _config(
        dict(
            rope_type="longrope",
            short_factor=short,
            long_factor=long,
            original_max_position_embeddings=32,
        )  # fmt: skip
    )
    table = _ours(config)
    cos_short, sin_short = _hf_cos_sin(config, list(range(32)))  # a sequence within 32 tokens
    torch.testing.assert_close(table[:32, : HEAD_DIM // 2], cos_short, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(table[:32, HEAD_DIM // 2 :], sin_short, atol=1e-5, rtol=1e-5)
    cos_long, sin_long = _hf_cos_sin(config, list(range(MAX_POS)))  # longer: long factors
    torch.testing.assert_close(table[32:, : HEAD_DIM // 2], cos_long[32:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(table[32:, HEAD_DIM // 2 :], sin_long[32:], atol=1e-5, rtol=1e-5)


def test_dynamic_ntk_table_is_plain_inside_and_per_length_beyond():
    config = _config(dict(rope_type="dynamic", factor=2.0))
    table = _ours(config)
    assert table.shape[0] == 2 * MAX_POS
    cos, sin = _hf_cos_sin(config, list(range(MAX_POS)))
    torch.testing.assert_close(table[:MAX_POS, : HEAD_DIM // 2], cos, atol=1e-5, rtol=1e-5)
    for position in (MAX_POS, MAX_POS + 17, 2 * MAX_POS - 1):  # HF decoding one token there
        cos, sin = _hf_cos_sin(_config(dict(rope_type="dynamic", factor=2.0)), [position])
        torch.testing.assert_close(table[position, : HEAD_DIM // 2], cos[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(table[position, HEAD_DIM // 2 :], sin[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("partial, factor", [(0.25, 1.0), (0.5, 2.0)])
def test_proportional_table_equals_transformers(partial, factor):
    """Gemma 4's full layers: a quarter (here also a half, scaled) of the frequencies turn, with
    exponents over the whole head; the rest of the head stays put."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(rope_type="proportional", partial_rotary_factor=partial, factor=factor)
    config = _config(params)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["proportional"](config)  # [HEAD_DIM // 2]
    freqs = torch.outer(torch.arange(MAX_POS, dtype=torch.float32), inv_freq)
    theta, scaling = rope_settings(config)
    table = get_rope(HEAD_DIM, HEAD_DIM, MAX_POS, theta, scaling).cos_sin_cache
    torch.testing.assert_close(table, torch.cat((freqs.cos(), freqs.sin()), -1))
    assert (inv_freq == 0).sum() == HEAD_DIM // 2 - int(partial * HEAD_DIM // 2)
