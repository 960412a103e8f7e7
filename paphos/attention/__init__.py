"""Attention over the paged KV cache: the `Attention` layer and the per-step `AttentionMetadata`."""

from paphos.attention.layer import Attention
from paphos.attention.metadata import AttentionMetadata

__all__ = ["Attention", "AttentionMetadata"]
