"""Activation layers of MLP blocks, and the activations named in transformers configs."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from paphos.ops.activation import gelu_and_mul
from paphos.ops.registry import pick


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x) ** 2 (NemotronH's MLP)."""
    return F.relu(x).square()


# transformers' hidden_act names -> the elementwise function (all but silu: torch's own)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "relu2": relu_squared,
}
_GATED: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": gelu_and_mul,
    "gelu_pytorch_tanh": functools.partial(gelu_and_mul, approximate="tanh"),
    "gelu_tanh": functools.partial(gelu_and_mul, approximate="tanh"),
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise activation transformers calls `name`."""
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def gated_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """act(gate) * up over [num_tokens, 2 * d] = [gate | up] -> [num_tokens, d]."""
    if name in ("silu", "swish"):
        return pick("silu_and_mul", torch.empty(0).device.type)
    if name not in _GATED:
        raise ValueError(f"gated hidden_act={name!r} is not supported (silu, gelu, gelu_tanh)")
    return _GATED[name]


class SiluAndMul(nn.Module):
    """[num_tokens, 2 * d] (gate | up) -> [num_tokens, d]."""

    def __init__(self) -> None:
        super().__init__()
        self._op = pick("silu_and_mul", torch.empty(0).device.type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x)


# GPT-2-era names: tanh approximations of GELU, and CLIP's quick_gelu
ACTIVATIONS.update(
    {
        "gelu_new": functools.partial(F.gelu, approximate="tanh"),
        "gelu_fast": functools.partial(F.gelu, approximate="tanh"),
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    }
)
