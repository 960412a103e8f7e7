"""Multi-head latent attention (MLA) over the paged cache: a layer whose cache holds one compressed
"head" per token (the latent and the rotated shared key: kv_lora_rank + rope_dim values), not
per-head keys and values (paphos.ops.mla_attention has the math).

Decode rows take the weight-absorbed form through the decode op picked at start-up (torch
reference on CPU, Triton on CUDA); prefill rows expand their context into per-head K/V. A
pure-decode step (one query token per sequence) reads nothing back to the host, so CUDA graphs can
capture it.
"""

from __future__ import annotations

import torch
from torch import nn

from paphos.attention.cache_spec import LayerCacheSpec
from paphos.attention.metadata import AttentionMetadata
from paphos.ops.mla_attention import absorb_query, mla_expanded_attention, unabsorb_output
from paphos.ops.registry import pick


class LatentAttention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        scale: float,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_heads", num_heads),
            ("kv_lora_rank", kv_lora_rank),
            ("qk_rope_head_dim", qk_rope_head_dim),
            ("v_head_dim", v_head_dim),
        ):
            if value < 1:
                raise ValueError(f"latent attention: {name}={value} must be >= 1")
        self.num_heads = num_heads
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.scale = scale
        device_type = torch.empty(0).device.type
        self._decode = pick("mla_decode_attention", device_type)
        self._write_cache = pick("write_latent_cache", device_type)

    def cache_spec(self) -> LayerCacheSpec:
        row = self.kv_lora_rank + self.qk_rope_head_dim
        qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
        return LayerCacheSpec("latent", 1, row, per_head_equivalent=(self.num_heads, qk_head))

    def forward(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent: torch.Tensor,
        k_pe: torch.Tensor,
        w_kv_b: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """q_nope [num_tokens, heads, nope], q_pe [num_tokens, heads, rope] (rotated); latent
        [num_tokens, kv_lora_rank] (normed), k_pe [num_tokens, rope] (rotated); w_kv_b [heads,
        nope + v, kv_lora_rank]: kv_b_proj's weight by head. Writes latent | k_pe to the cache;
        returns [num_tokens, heads * v_head_dim]."""
        meta = attn_metadata
        self._write_cache(latent, k_pe, kv_cache, meta.slot_mapping)
        num_tokens = q_nope.shape[0]
        if num_tokens == meta.num_seqs:  # one query token per sequence: all absorbed
            out = self.absorbed(q_nope, q_pe, w_kv_b, kv_cache, meta.seq_lens, meta.block_tables)
            return out.reshape(num_tokens, -1)
        starts = meta.query_start_loc.tolist()
        lens = meta.seq_lens.tolist()
        out = q_nope.new_empty(num_tokens, self.num_heads, self.v_head_dim)
        decodes = [b for b in range(len(lens)) if starts[b + 1] - starts[b] == 1]
        if decodes:
            rows = torch.tensor([starts[b] for b in decodes], device=q_nope.device)
            seq_lens, tables = meta.seq_lens[decodes], meta.block_tables[decodes]
            out[rows] = self.absorbed(q_nope[rows], q_pe[rows], w_kv_b, kv_cache, seq_lens, tables)
        for b, seq_len in enumerate(lens):
            s, e = starts[b], starts[b + 1]
            if e - s > 1:
                out[s:e] = mla_expanded_attention(
                    q_nope[s:e], q_pe[s:e], kv_cache, seq_len, meta.block_tables[b], w_kv_b,
                    self.scale,
                )  # fmt: skip
        return out.reshape(num_tokens, -1)  # [num_tokens, heads * v_head_dim]

    def absorbed(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        w_kv_b: torch.Tensor,
        kv_cache: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
    ) -> torch.Tensor:
        """Decode rows (one per sequence) in the absorbed form: [num_seqs, heads, v_head_dim]."""
        query = absorb_query(q_nope, q_pe, w_kv_b)  # [num_seqs, heads, rank + rope]
        out_latent = self._decode(
            query, kv_cache, seq_lens, block_tables, self.scale, self.kv_lora_rank
        )  # [num_seqs, heads, rank]
        return unabsorb_output(out_latent, w_kv_b, self.v_head_dim)
