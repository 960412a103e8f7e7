"""What every paphos causal LM shares past its decoder: the LM head (tied to the embedding or
not), logits of the rows to sample, and the shared sampler."""

from __future__ import annotations

import torch
from torch import nn

from paphos.attention import AttentionMetadata
from paphos.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from paphos.layers.logits import LogitsProcessor
from paphos.layers.sampler import Sampler, SamplerOutput, SamplingMetadata
from paphos.parallel import ParallelInfo


class CausalLMHead(nn.Module):
    """Base of a model class: `lm_head` (with a bias where the checkpoint has one), tied to
    `embedding` when `tie` is set; `compute_logits` and `sample` of the contract."""

    def init_head(
        self,
        vocab_size: int,
        hidden_size: int,
        embedding: VocabParallelEmbedding,
        parallel: ParallelInfo,
        tie: bool,
        bias: bool = False,
    ) -> None:
        self.lm_head = ParallelLMHead(vocab_size, hidden_size, bias=bias, parallel=parallel)
        self.tie_word_embeddings = tie
        if tie:
            self.lm_head.tie_weights(embedding)
        self.logits_processor = LogitsProcessor(vocab_size, parallel)
        self.sampler = Sampler()

    def compute_logits(
        self, hidden_states: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        selected = hidden_states.index_select(0, attn_metadata.logits_indices)
        return self.logits_processor(self.lm_head, selected)  # [num_logits, vocab_size]

    def sample(self, logits: torch.Tensor, sampling_metadata: SamplingMetadata) -> SamplerOutput:
        return self.sampler(logits, sampling_metadata)
