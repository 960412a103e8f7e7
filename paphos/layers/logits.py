"""Logits from hidden states: each rank projects onto its vocabulary slice; slices are gathered.

Invariant: the result is float32 [num_tokens, vocab_size] on every rank, padding columns cut off.
"""

from __future__ import annotations

import torch
from torch import nn

from paphos.layers.embedding import ParallelLMHead
from paphos.ops import dense
from paphos.parallel import SINGLE_PROCESS, ParallelInfo, all_gather


class LogitsProcessor(nn.Module):
    """hidden_states [num_tokens, hidden] -> logits [num_tokens, vocab_size] (float32)."""

    def __init__(self, vocab_size: int, parallel: ParallelInfo = SINGLE_PROCESS) -> None:
        super().__init__()
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size!r} is invalid: expected a positive int")
        self.vocab_size = vocab_size
        self.parallel = parallel

    def forward(self, lm_head: ParallelLMHead, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.vocab_size > lm_head.num_embeddings_padded:
            raise ValueError(
                f"vocab_size={self.vocab_size} exceeds the LM head's "
                f"{lm_head.num_embeddings_padded} rows"
            )
        source, method = lm_head.projection()
        if method is not None:  # packed (quantized) rows
            logits = method.apply(source, hidden_states.float(), lm_head.bias)  # [num, rows] fp32
        else:
            batch_weight = getattr(lm_head, "batch_weight", None)
            # [num, rows_per_rank] float32, stored so by the CUDA GEMV/skinny GEMM (no conversion)
            logits = dense.linear(
                hidden_states, lm_head.weight, lm_head.bias, batch_weight, out_dtype=torch.float32
            )
        logits = all_gather(logits, self.parallel, dim=-1)  # [num, num_embeddings_padded]
        return logits[..., : self.vocab_size]  # [num, vocab_size] float32

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, world_size={self.parallel.world_size}"
