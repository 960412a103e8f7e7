"""Mixture-of-experts references: routing (which experts each token takes, with what weight) and
the experts' products over stacked weights. These are the CPU path and the oracle of the Triton
kernel (paphos.kernels.fused_moe).

Invariant: `fused_experts` runs one product per active expert over the tokens routed to it
(tokens grouped by expert with one sort, never a loop over tokens), so a decode step of one token
reads only the weights of the experts it chose (through the CPU matvec kernel where it loaded).
Expert ids of -1 contribute nothing (experts held by another rank under expert parallelism).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from paphos.kernels.cpu import matvec

Scoring = Literal["softmax", "softmax_topk", "sigmoid", "sigmoid_topk"]
GroupScore = Literal["max", "top2_sum"]
EXPERT_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swiglu_oai")


@dataclass(frozen=True)
class RouterSpec:
    """How a router turns its logits [num_tokens, num_experts] into top-k experts and weights.

    scoring: "softmax" (Mixtral, Qwen, OLMoE, DeepSeek V2: top-k of the softmax), "softmax_topk"
    (Granite MoE, gpt-oss: softmax over the top-k logits), "sigmoid" (DeepSeek V3, GLM-4 MoE,
    MiniMax M2) or "sigmoid_topk" (Llama 4: the sigmoid of each top-k logit). `correction_bias`:
    a per-expert bias added to the scores for the choice only (`e_score_correction_bias`).
    `num_groups`/`topk_groups`: experts split into groups, only the `topk_groups` best groups
    eligible; a group scores its "max" (DeepSeek V2) or the sum of its
    two best ("top2_sum", V3). `renormalize`: chosen weights divided by their sum
    (`norm_topk_prob`); then all are multiplied by `routed_scaling_factor`.
    """

    num_experts: int
    top_k: int
    scoring: Scoring = "softmax"
    renormalize: bool = False
    correction_bias: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    group_score: GroupScore = "top2_sum"
    routed_scaling_factor: float = 1.0
    # torch.topk's `sorted` for the choice (ties can break differently on the CPU): None is
    # transformers' usual (sorted, but unsorted for sigmoid scores or groups); DeepSeek V2: False
    topk_sorted: bool | None = None

    @property
    def sorted_choice(self) -> bool:
        if self.topk_sorted is not None:
            return self.topk_sorted
        return self.scoring != "sigmoid" and self.num_groups == 1

    def __post_init__(self) -> None:
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} is invalid for num_experts={self.num_experts}: expected "
                "1 <= top_k <= num_experts"
            )
        if self.scoring not in ("softmax", "softmax_topk", "sigmoid", "sigmoid_topk"):
            raise ValueError(
                f"scoring={self.scoring!r} is invalid: softmax/softmax_topk/sigmoid/sigmoid_topk"
            )
        if self.num_experts % self.num_groups or not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(
                f"num_groups={self.num_groups}, topk_groups={self.topk_groups} are invalid for "
                f"{self.num_experts} experts: groups must divide the experts, 1 <= topk_groups "
                "<= num_groups"
            )
        if self.num_groups > 1 and self.scoring.endswith("_topk"):
            raise ValueError("grouped top-k needs scoring 'softmax' or 'sigmoid'")


def select_experts(
    router_logits: torch.Tensor, spec: RouterSpec, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [num_tokens, num_experts] -> (weights float32 [num_tokens, top_k], expert ids
    int64 [num_tokens, top_k]), with the operations (and so the tie-breaking) of transformers."""
    logits = router_logits.float()
    if spec.scoring.endswith("_topk"):  # the top-k logits, then their softmax / sigmoids
        top_logits, ids = torch.topk(logits, spec.top_k, dim=-1)  # [num_tokens, top_k]
        weights = (
            top_logits.softmax(dim=-1) if spec.scoring == "softmax_topk" else top_logits.sigmoid()
        )
    else:
        scores = logits.softmax(dim=-1) if spec.scoring == "softmax" else logits.sigmoid()
        choice = scores if correction_bias is None else scores + correction_bias.float()
        if spec.num_groups > 1:
            choice = _mask_to_top_groups(choice, spec)
        ids = torch.topk(choice, spec.top_k, dim=-1, sorted=spec.sorted_choice)[1]
        weights = scores.gather(1, ids)  # [num_tokens, top_k]: the scores, never the bias
    if spec.renormalize and spec.scoring != "softmax_topk":  # (softmax_topk sums to 1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    return weights, ids


def _mask_to_top_groups(choice: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Scores of experts outside the `topk_groups` best groups set to the lowest value (0 for
    DeepSeek V2's softmax scores, -inf for V3's biased sigmoid ones, as transformers does)."""
    num_tokens = choice.shape[0]
    grouped = choice.view(num_tokens, spec.num_groups, -1)  # [num_tokens, groups, per_group]
    if spec.group_score == "max":
        group_scores = grouped.max(dim=-1).values  # [num_tokens, groups]
    else:
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_ids = torch.topk(group_scores, spec.topk_groups, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(group_scores).scatter_(1, group_ids, 1.0).bool()  # [tokens, groups]
    keep = keep.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, -1)  # [tokens, experts]
    fill = 0.0 if spec.group_score == "max" else float("-inf")
    return choice.masked_fill(~keep, fill)


def expert_activation(
    gate_up: torch.Tensor, activation: str, alpha: float = 1.702, limit: float | None = None
) -> torch.Tensor:
    """[n, 2 * d] = [gate | up] -> [n, d]. "swiglu_oai" is gpt-oss's clamped SwiGLU:
    (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)."""
    d = gate_up.shape[-1] // 2
    gate, up = gate_up[..., :d], gate_up[..., d:]
    if activation == "silu":
        return F.silu(gate) * up
    if activation in ("gelu", "gelu_tanh"):
        return F.gelu(gate, approximate="tanh" if activation == "gelu_tanh" else "none") * up
    if activation == "swiglu_oai":
        if limit is not None:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    raise ValueError(f"activation={activation!r} is invalid: expected one of {EXPERT_ACTIVATIONS}")


@dataclass(frozen=True)
class ExpertActivation:
    """The activation between an expert's gate_up and down products."""

    name: str = "silu"
    alpha: float = 1.702  # swiglu_oai only
    limit: float | None = None  # swiglu_oai only

    def __post_init__(self) -> None:
        if self.name not in EXPERT_ACTIVATIONS:
            raise ValueError(
                f"activation={self.name!r} is invalid: expected one of {EXPERT_ACTIVATIONS}"
            )

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        return expert_activation(gate_up, self.name, self.alpha, self.limit)


SILU = ExpertActivation()  # Mixtral's, Qwen's, DeepSeek's


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: ExpertActivation = SILU,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_k topk_weights[t, k] * down_e(act(gate_up_e(x[t]))) for e = topk_ids[t, k].

    x [num_tokens, hidden]; w13 [num_experts, 2 * inter, hidden] ([gate | up] rows); w2
    [num_experts, hidden, inter]; biases [num_experts, 2 * inter] and [num_experts, hidden];
    topk_* [num_tokens, top_k] (ids of -1 skipped). Returns [num_tokens, hidden] in x's dtype,
    summed in float32.
    """

    def expert_mlp(expert: int, rows: torch.Tensor) -> torch.Tensor:
        h = _linear(rows, w13[expert], None if w13_bias is None else w13_bias[expert])
        return _linear(activation(h), w2[expert], None if w2_bias is None else w2_bias[expert])

    return routed_sum(x, topk_weights, topk_ids, w13.shape[0], w2.shape[1], expert_mlp)


def routed_sum(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    out_features: int,
    expert_mlp: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_mlp(e, x[t]) for e = topk_ids[t, k], calling
    `expert_mlp(e, rows [n, hidden]) -> [n, out_features]` once per active expert with the rows
    routed to it (so only those experts' weights are read); ids of -1 skipped. Slots (token, k)
    are grouped by expert with one stable argsort; the sum is float32, returned in x's dtype."""
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)  # [num_tokens * top_k]
    order = torch.argsort(flat_ids, stable=True)  # slots grouped by expert, tokens in order
    counts = torch.bincount(flat_ids + 1, minlength=num_experts + 1).tolist()  # [-1, 0, 1, ..]
    out = torch.zeros(num_tokens, out_features, dtype=torch.float32, device=x.device)
    start = counts[0]  # the slots of id -1 sort first
    for expert, count in enumerate(counts[1:]):
        if count == 0:
            continue
        slots = order[start : start + count]  # [count]
        start += count
        tokens = slots // top_k
        y = expert_mlp(expert, x[tokens])  # [count, out_features]
        weight = topk_weights.reshape(-1)[slots].float()  # [count]
        out.index_add_(0, tokens, y.float() * weight[:, None])
    return out.to(x.dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear; the few rows a decode step routes to an expert (at most matvec.MAX_ROWS) go to
    the CPU matrix-vector kernel where it loaded (bf16 weights: ~1.4x torch's speed, measured)."""
    if matvec.supports(x, weight):
        lib = matvec.load_library()
        if lib is not None:
            return matvec.launch(lib, x, weight, bias, torch.get_num_threads())
    return F.linear(x, weight, bias)
