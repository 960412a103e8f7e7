"""One online-softmax step over a tile of paged KV, shared by the decode and prefill kernels.

Invariant: without a sliding window, a row's running max `m` is finite once its first tile was
attended (the first tile of every program holds a key each row may see), so `exp2(m - m_new)`
never sees -inf - -inf. With a window (WINDOW: keys > q_pos - window) or chunks (CHUNK: keys of
the row's own chunk of `window` positions) a row may see nothing in a tile; its max stays -inf and
0 stands in for it in the exponentials (its probabilities are 0).
Scores are kept in the log2 domain: `scale_log2 = scale * log2(e)`. With a soft-cap c (SOFT_CAP)
the caller passes `scale_log2 = scale / c` and `cap_log2 = c * log2(e)`: the score is
tanh(q.k * scale / c) * c * log2(e).
With KV_FP8 the cache holds fp8 K/V: each tile is upcast to q's dtype (exact) before its dot;
the per-tensor scales stay outside the tile (the caller folds k_scale into `scale_log2` and
multiplies the normalized output by v_scale).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def attend_tile(
    q,
    acc,
    m,
    l_sum,
    cache_ptr,
    block_table_ptr,
    kv_head,
    start,
    kv_end,
    q_pos,
    scale_log2,
    window,
    cap_log2,
    stride_kv,
    stride_blk,
    stride_tok,
    stride_head,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
    WINDOW: tl.constexpr = False,
    SOFT_CAP: tl.constexpr = False,
    CHUNK: tl.constexpr = False,
    KV_FP8: tl.constexpr = False,
):
    """q: [M, HEAD_PAD]; acc: [M, HEAD_PAD] f32; m, l_sum: [M] f32; keys start..start+BLOCK_N-1.
    CHUNK: `window` is a chunk size; a row sees only the keys of its own chunk."""
    toks = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    tok_mask = toks < kv_end
    pages = tl.load(block_table_ptr + toks // PAGE_SIZE, mask=tok_mask, other=0).to(tl.int64)
    offsets = pages * stride_blk + (toks % PAGE_SIZE) * stride_tok + kv_head * stride_head
    dims = tl.arange(0, HEAD_PAD)  # [HEAD_PAD]
    kv_mask = tok_mask[:, None] & (dims < HEAD_SIZE)[None, :]
    kv_ptrs = cache_ptr + offsets[:, None] + dims[None, :]  # [BLOCK_N, HEAD_PAD]
    k = tl.load(kv_ptrs, mask=kv_mask, other=0.0)
    if KV_FP8:
        k = k.to(q.dtype)
    s = _dot(q, tl.trans(k), IEEE) * scale_log2  # [M, BLOCK_N]
    if SOFT_CAP:
        s = (2.0 * tl.sigmoid(2.0 * s) - 1.0) * cap_log2  # tanh(s) * c * log2(e)
    visible = tok_mask[None, :]  # [1, BLOCK_N]
    if CAUSAL:
        visible = visible & (toks[None, :] <= q_pos[:, None])
    if WINDOW:
        visible = visible & (toks[None, :] > q_pos[:, None] - window)
    if CHUNK:
        visible = visible & (toks[None, :] >= (q_pos - q_pos % window)[:, None])
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))  # [M]
    m_exp = m_new
    if WINDOW or CHUNK:
        m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet
    alpha = tl.exp2(m - m_exp)
    p = tl.exp2(s - m_exp[:, None])  # [M, BLOCK_N]
    l_sum = l_sum * alpha + tl.sum(p, axis=1)
    v = tl.load(kv_ptrs + stride_kv, mask=kv_mask, other=0.0)
    if KV_FP8:
        v = v.to(q.dtype)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, m_new, l_sum


LOG2_E_SINK = tl.constexpr(1.4426950408889634)  # the sink logits (natural log) into the log2 domain


@triton.jit
def normalize_with_sinks(acc, m, l_sum, sinks_ptr, heads, head_mask, HAS_SINKS: tl.constexpr):
    """acc / l_sum per row; with HAS_SINKS each row's head's sink logit joins the denominator
    (exp(sink) beside the keys' exp(scores), in the log2 domain of `m`)."""
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + heads, mask=head_mask, other=float("-inf")) * LOG2_E_SINK
        m_new = tl.maximum(m, sink)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded rows: nothing at all
        alpha = tl.exp2(m - m_new)
        l_sum = l_sum * alpha + tl.exp2(sink - m_new)
        acc = acc * alpha[:, None]
    return acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
