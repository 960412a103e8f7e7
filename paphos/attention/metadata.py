"""Where each sequence's tokens sit in the flat batch and in the paged KV cache, for one step."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot each token's K/V is written to
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32/int64: sequence b's tokens are [b]:[b+1]
    seq_lens: torch.Tensor  # [num_seqs]: context length after this step (cached + new tokens)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32/int64: blocks of each sequence
    logits_indices: torch.Tensor  # [num_logits] int64: flat token rows whose logits are needed
    # Host-side upper bounds of this step (never read back from the device). A captured decode
    # graph keeps max_query_len == 1 and a fixed max_seq_len (the longest sequence it serves).
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
