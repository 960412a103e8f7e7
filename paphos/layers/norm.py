"""RMSNorm layer; with a residual it fuses the add that precedes it (returns the new residual
too)."""

from __future__ import annotations

import torch
from torch import nn

from paphos.ops.registry import pick


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))  # [hidden_size]
        self.eps = eps
        device_type = self.weight.device.type
        self._rms_norm = pick("rms_norm", device_type)
        self._fused_add_rms_norm = pick("fused_add_rms_norm", device_type)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._rms_norm(x, self.weight, self.eps)
        return self._fused_add_rms_norm(x, residual, self.weight, self.eps)
