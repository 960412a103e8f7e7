"""Where each sequence's tokens sit in the flat batch and in the paged KV cache, for one step.

A model with sliding-window layers has several KV cache groups (`paphos.core.kv_cache_groups`),
each with its own block tables and slots: `slot_mapping`/`block_tables` are group 0's, the others
in `group_tables`; a layer reads its own through `kv_group`.
"""

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
    # Hybrid models: each sequence's recurrent-state slot [num_seqs] int64 (padded rows of a graph
    # batch: the scratch slot); None for models without state layers. A sequence continues its
    # slot's state when it has context (seq_lens > its query length), else starts from zeros.
    state_indices: torch.Tensor | None = None
    # (slot_mapping, block_tables) of KV cache groups 1, 2, ... (shapes as group 0's)
    group_tables: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()

    def kv_group(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot_mapping [num_tokens], block_tables [num_seqs, max_blocks]) of one group."""
        if group == 0:
            return self.slot_mapping, self.block_tables
        return self.group_tables[group - 1]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    def has_initial_state(self) -> torch.Tensor:
        """[num_seqs] bool, on the device (no host sync): the sequence has computed tokens before
        this step, so its state slot holds the state to continue from."""
        query_lens = self.query_start_loc[1:] - self.query_start_loc[:-1]  # [num_seqs]
        return self.seq_lens > query_lens
