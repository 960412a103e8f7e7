"""Activation layers of MLP blocks."""

from __future__ import annotations

import torch
from torch import nn

from paphos.ops.registry import pick


class SiluAndMul(nn.Module):
    """[num_tokens, 2 * d] (gate | up) -> [num_tokens, d]."""

    def __init__(self) -> None:
        super().__init__()
        self._op = pick("silu_and_mul", torch.empty(0).device.type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x)
