"""Triton fused mixture-of-experts on CUDA: the reference's sum over chosen experts
(paphos.ops.moe.fused_experts) as two grouped GEMMs (or, for a few slots, two per-slot GEMVs).

The token-expert slots ([num_tokens * top_k], slot = token * top_k + k) are sorted by expert and
each expert's run padded to a multiple of BLOCK_M (`moe_align_block_size`, torch ops with no host
sync: CUDA-graph capturable). Each program of the first kernel takes one block of one expert and
one tile of intermediate features: it streams the block's token rows against that expert's gate
and up rows and stores act(gate) * up for its slots; the second multiplies those by the expert's
down weight, scales by the routing weight and stores float32 per slot; the slots of a token are
then summed. Blocks of experts no token chose are never launched past their first load, so a
decode step reads only the chosen experts' weights. Roundings follow the reference (each product
output rounded to the activation dtype); sums are float32. At most SLOT_KERNEL_MAX_SLOTS slots
(decode of one or two tokens) skip the sort: one program per slot and feature tile streams its
expert's rows as a GEMV (fewer launches; a shared expert is read once per slot choosing it).
"""

from __future__ import annotations

from typing import Protocol

import torch
import triton
import triton.language as tl

from paphos.kernels._checks import check_dim, check_float_dtype, check_same_device, check_size

# ops.moe.ExpertActivation's names (not imported: importing this package's kernels must not
# import ops.moe, which imports paphos.kernels.cpu)
ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "swiglu_oai": 3}


class Activation(Protocol):
    """What the kernels read of an ops.moe.ExpertActivation."""

    name: str
    alpha: float
    limit: float | None


def block_m_for(num_slots: int, num_experts: int) -> int:
    """Rows per block: about the mean slots per expert, 16 to 64."""
    per_expert = num_slots / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64


def moe_align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_slots [num_blocks * block_m], block_experts [num_blocks]): the slots grouped by
    expert, each expert's run padded to block_m with `num_slots` (no slot); the expert of each
    block, -1 for blocks past the last. Ids of -1 take no slot. num_blocks is an upper bound fixed
    by the shapes (no host sync)."""
    flat = topk_ids.reshape(-1)
    num_slots = flat.numel()
    device = flat.device
    experts = torch.where(flat < 0, num_experts, flat)  # [num_slots]; -1 -> a last bucket
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, experts, torch.ones_like(experts))
    counts = counts[:num_experts]  # [num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)  # [num_experts]
    padded_start, run_start = padded_end - padded, counts.cumsum(0) - counts
    order = torch.sort(experts, stable=True).indices  # [num_slots] slots by expert
    sorted_experts = experts[order]
    valid = sorted_experts < num_experts
    expert = sorted_experts.clamp(max=num_experts - 1)
    rank = torch.arange(num_slots, device=device) - run_start[expert]  # place in its run
    num_blocks = triton.cdiv(
        min(num_slots + num_experts * (block_m - 1), num_slots * block_m), block_m
    )
    capacity = num_blocks * block_m
    dest = torch.where(valid, padded_start[expert] + rank, capacity)  # [num_slots]
    sorted_slots = torch.full((capacity + 1,), num_slots, dtype=torch.int32, device=device)
    sorted_slots.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(num_blocks, device=device) * block_m  # [num_blocks]
    block_experts = torch.searchsorted(padded_end, block_start, right=True)
    block_experts = torch.where(block_start < padded_end[-1], block_experts, -1)
    return sorted_slots[:capacity], block_experts.to(torch.int32)


@triton.jit
def _activate(gate, up, alpha, limit, ACT: tl.constexpr):
    """act(gate) * up in float32 (ACT: ACT_CODES)."""
    if ACT == 0:
        return gate * tl.sigmoid(gate) * up
    elif ACT == 1:
        return 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)) * up
    elif ACT == 2:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        return 0.5 * gate * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0)) * up
    else:  # gpt-oss: clamped, (up + 1) * gate * sigmoid(alpha * gate)
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return (up + 1.0) * (gate * tl.sigmoid(gate * alpha))


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, slots_ptr, block_experts_ptr,
    num_slots, hidden, inter, top_k, stride_x, stride_we, stride_wn, stride_be, stride_out,
    alpha, limit,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    slots = tl.load(slots_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    row_ok = slots < num_slots
    tokens = (slots // top_k).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # intermediate features
    col_ok = cols < inter
    w_base = w_ptr + expert * stride_we
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        a = tl.load(x_ptr + tokens[:, None] * stride_x + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        w_mask = k_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0)
        w_up = tl.load(w_base + (cols[None, :] + inter) * stride_wn + ks[:, None], mask=w_mask,
                       other=0.0)  # fmt: skip
        acc_gate = tl.dot(a, w_gate, acc_gate, input_precision=PRECISION)
        acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc_gate += tl.load(b_ptr + expert * stride_be + cols, mask=col_ok, other=0.0)[None, :]
        acc_up += tl.load(b_ptr + expert * stride_be + inter + cols, mask=col_ok, other=0.0)[
            None, :
        ]
    gate = acc_gate.to(dtype).to(tl.float32)  # the product output rounded, as the reference's
    up = acc_up.to(dtype).to(tl.float32)
    h = _activate(gate, up, alpha, limit, ACT)
    out = out_ptr + slots[:, None].to(tl.int64) * stride_out + cols[None, :]
    tl.store(out, h.to(dtype), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, b_ptr, weights_ptr, out_ptr, slots_ptr, block_experts_ptr,
    num_slots, inter, hidden, stride_h, stride_we, stride_wn, stride_be, stride_out,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    slots = tl.load(slots_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = slots < num_slots
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # hidden features
    col_ok = cols < hidden
    w_base = w_ptr + expert * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < inter
        a = tl.load(h_ptr + slots[:, None] * stride_h + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        w = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + cols, mask=col_ok, other=0.0)[None, :]
    y = acc.to(h_ptr.dtype.element_ty).to(tl.float32)  # rounded as the reference's product
    y *= tl.load(weights_ptr + slots, mask=row_ok, other=0.0)[:, None]
    tl.store(out_ptr + slots[:, None] * stride_out + cols[None, :], y,
             mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


def _check(x, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias) -> None:
    for name, t in (("x", x), ("w13", w13), ("w2", w2)):
        check_float_dtype(name, t)
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have contiguous rows (stride {t.stride()})")
    check_dim("x", x, 2)
    check_dim("w13", w13, 3)
    check_dim("w2", w2, 3)
    num_experts, inter = w13.shape[0], w2.shape[2]
    check_size("w13", w13.shape[1], 2 * inter, "rows (2 * intermediate)")
    check_size("w13", w13.shape[2], x.shape[1], "columns (hidden)")
    check_size("w2", w2.shape[0], num_experts, "experts")
    check_size("w2", w2.shape[1], x.shape[1], "rows (hidden)")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must "
            f"both be [num_tokens={x.shape[0]}, top_k]"
        )
    for name, bias, width in (("w13_bias", w13_bias, 2 * inter), ("w2_bias", w2_bias, x.shape[1])):
        if bias is not None and (tuple(bias.shape) != (num_experts, width) or bias.stride(-1) != 1):
            raise ValueError(
                f"{name} has shape {tuple(bias.shape)}; expected ({num_experts}, {width})"
            )
    check_same_device(x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids)


# Up to this many (token, expert) slots (decode of 1-2 tokens at top-8) each program takes one
# slot: no sort and pad launches, each chosen expert's weights streamed once per slot.
SLOT_KERNEL_MAX_SLOTS = 16


@triton.jit
def _slot_gate_up_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, ids_ptr,
    hidden, inter, top_k, stride_x, stride_we, stride_wn, stride_be, stride_out, alpha, limit,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One slot (token, k) and BLOCK_N intermediate features: act(gate) * up as a GEMV."""
    slot, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(ids_ptr + slot).to(tl.int64)
    if expert < 0:
        return
    token = (slot // top_k).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    w_base = w_ptr + expert * stride_we
    acc_gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        a = tl.load(x_ptr + token * stride_x + ks, mask=k_ok, other=0.0).to(tl.float32)
        w_mask = col_ok[:, None] & k_ok[None, :]
        w_gate = tl.load(w_base + cols[:, None] * stride_wn + ks[None, :], mask=w_mask, other=0.0)
        w_up = tl.load(w_base + (cols[:, None] + inter) * stride_wn + ks[None, :], mask=w_mask,
                       other=0.0)  # fmt: skip
        acc_gate += tl.sum(w_gate.to(tl.float32) * a[None, :], axis=1)
        acc_up += tl.sum(w_up.to(tl.float32) * a[None, :], axis=1)
    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc_gate += tl.load(b_ptr + expert * stride_be + cols, mask=col_ok, other=0.0)
        acc_up += tl.load(b_ptr + expert * stride_be + inter + cols, mask=col_ok, other=0.0)
    gate = acc_gate.to(dtype).to(tl.float32)  # rounded as the reference's product
    up = acc_up.to(dtype).to(tl.float32)
    h = _activate(gate, up, alpha, limit, ACT)
    tl.store(out_ptr + slot.to(tl.int64) * stride_out + cols, h.to(dtype), mask=col_ok)


@triton.jit
def _slot_down_kernel(
    h_ptr, w_ptr, b_ptr, weights_ptr, out_ptr, ids_ptr,
    inter, hidden, stride_h, stride_we, stride_wn, stride_be, stride_out,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One slot and BLOCK_N hidden features: its expert's down product, scaled (float32)."""
    slot, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(ids_ptr + slot).to(tl.int64)
    if expert < 0:
        return
    slot64 = slot.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    w_base = w_ptr + expert * stride_we
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < inter
        a = tl.load(h_ptr + slot64 * stride_h + ks, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_base + cols[:, None] * stride_wn + ks[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
        acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + cols, mask=col_ok, other=0.0)
    y = acc.to(h_ptr.dtype.element_ty).to(tl.float32) * tl.load(weights_ptr + slot)
    tl.store(out_ptr + slot64 * stride_out + cols, y, mask=col_ok)


class _Silu:
    name, alpha, limit = "silu", 1.702, None


_SILU = _Silu()


def _products_per_slot(x, w13, w2, weights, topk_ids, activation, b13, b2, h, per_slot) -> None:  # noqa: ANN001
    ids = topk_ids.reshape(-1).contiguous()  # [slots]
    num_slots, inter, hidden = ids.shape[0], w2.shape[2], x.shape[1]
    block_n, block_k = 32, 128
    bias13, bias2 = (w13 if b13 is None else b13), (w2 if b2 is None else b2)
    _slot_gate_up_kernel[(num_slots, triton.cdiv(inter, block_n))](
        x, w13, bias13, h, ids,
        hidden, inter, topk_ids.shape[1], x.stride(0), w13.stride(0), w13.stride(1),
        bias13.stride(0), h.stride(0), *_activation_args(activation),
        HAS_BIAS=b13 is not None, ACT=ACT_CODES[activation.name],
        BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    _slot_down_kernel[(num_slots, triton.cdiv(hidden, block_n))](
        h, w2, bias2, weights, per_slot, ids,
        inter, hidden, h.stride(0), w2.stride(0), w2.stride(1), bias2.stride(0),
        per_slot.stride(0),
        HAS_BIAS=b2 is not None, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip


def _products_grouped(x, w13, w2, weights, topk_ids, activation, b13, b2, h, per_slot) -> None:  # noqa: ANN001
    num_slots, hidden = h.shape[0], x.shape[1]
    num_experts, inter, top_k = w13.shape[0], w2.shape[2], topk_ids.shape[1]
    block_m = block_m_for(num_slots, num_experts)
    slots, block_experts = moe_align_block_size(topk_ids, num_experts, block_m)
    num_blocks = block_experts.shape[0]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is unused for half inputs
    block_n, block_k = 64, 32
    bias13, bias2 = (w13 if b13 is None else b13), (w2 if b2 is None else b2)
    _gate_up_kernel[(num_blocks, triton.cdiv(inter, block_n))](
        x, w13, bias13, h, slots, block_experts,
        num_slots, hidden, inter, top_k, x.stride(0), w13.stride(0), w13.stride(1),
        bias13.stride(0), h.stride(0), *_activation_args(activation),
        HAS_BIAS=b13 is not None, ACT=ACT_CODES[activation.name], PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    _down_kernel[(num_blocks, triton.cdiv(hidden, block_n))](
        h, w2, bias2, weights, per_slot, slots, block_experts,
        num_slots, inter, hidden, h.stride(0), w2.stride(0), w2.stride(1), bias2.stride(0),
        per_slot.stride(0),
        HAS_BIAS=b2 is not None, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip


def _activation_args(activation: Activation) -> tuple[float, float]:
    limit = activation.limit if activation.limit is not None else float("inf")
    return float(activation.alpha), float(limit)


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: Activation | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    per_slot_products: bool | None = None,
) -> torch.Tensor:
    """paphos.ops.moe.fused_experts (same arguments and result): per-slot GEMVs for at most
    SLOT_KERNEL_MAX_SLOTS slots, else the grouped GEMMs over expert-padded blocks
    (`per_slot_products` forces one of them, for tests). activation None: SiLU."""
    _check(x, w13, w2, topk_weights, topk_ids, w13_bias, w2_bias)
    if activation is None:
        activation = _SILU
    if activation.name not in ACT_CODES:
        raise ValueError(
            f"activation {activation.name!r} is invalid: expected one of {list(ACT_CODES)}"
        )
    num_tokens, hidden = x.shape
    num_slots, top_k = topk_ids.numel(), topk_ids.shape[1]
    x = x.contiguous()
    h = torch.empty(num_slots, w2.shape[2], dtype=x.dtype, device=x.device)  # [slots, inter]
    per_slot = torch.zeros(num_slots, hidden, dtype=torch.float32, device=x.device)
    weights = topk_weights.reshape(-1).float().contiguous()  # [slots]
    if per_slot_products is None:
        per_slot_products = num_slots <= SLOT_KERNEL_MAX_SLOTS
    run = _products_per_slot if per_slot_products else _products_grouped
    run(x, w13, w2, weights, topk_ids, activation, w13_bias, w2_bias, h, per_slot)
    return per_slot.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)
