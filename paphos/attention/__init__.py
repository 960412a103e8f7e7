"""Attention over the paged KV cache: the `Attention` layer (K/V per head), `LatentAttention`
(MLA: one latent "head" per token) and the per-step `AttentionMetadata`."""

from paphos.attention.latent import LatentAttention
from paphos.attention.layer import Attention
from paphos.attention.metadata import AttentionMetadata

__all__ = ["Attention", "AttentionMetadata", "LatentAttention"]
