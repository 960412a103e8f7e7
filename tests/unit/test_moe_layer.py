"""FusedMoE and its references (paphos.layers.moe, paphos.ops.moe): every router variant against
transformers' own router of the family that uses it (fed the same logits through an identity
gate, so ties break on identical values) and against a direct computation; the grouped products
against a loop over tokens; the weight loader's parts; a decode token reading only its experts.
Tensor and expert parallelism: tests/unit/test_parallel_layers.py (check_fused_moe)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.testing import assert_close

from paphos.layers.moe import FusedMoE, MoESpec, map_expert_name
from paphos.ops.moe import ExpertActivation, RouterSpec, fused_experts, select_experts

NUM_EXPERTS, NUM_TOKENS = 8, 64


def _logits(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if kind == "ties":  # few distinct values: many exact ties at the top-k boundary
        return torch.randint(-2, 3, (NUM_TOKENS, NUM_EXPERTS), generator=gen).float()
    return torch.randn(NUM_TOKENS, NUM_EXPERTS, generator=gen)


def _hf_router(name: str, **config):
    """transformers' router `name` with an identity gate: its logits are its input."""
    family, classes = name.split(":")
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    config_class, router_class = classes.split("/")
    cfg = getattr(transformers, config_class)(
        hidden_size=NUM_EXPERTS, num_attention_heads=2, num_key_value_heads=2, **config
    )
    router = getattr(module, router_class)(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(NUM_EXPERTS))
        if getattr(router, "bias", None) is not None:
            router.bias.zero_()
    return router


def _hf_route(router, logits: torch.Tensor, bias: torch.Tensor | None):
    with torch.no_grad():
        if bias is not None and hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.copy_(bias)
        if bias is None or hasattr(router, "e_score_correction_bias"):
            out = router(logits)
        else:  # MiniMax M2: the block holds the bias and passes it in
            out = router(logits, bias)
    return out[1].float(), out[2]


# family -> (transformers module:Config/Router, its config, our RouterSpec, correction bias?)
ROUTERS = {
    "mixtral": ("mixtral:MixtralConfig/MixtralTopKRouter",
                dict(num_local_experts=8, num_experts_per_tok=2),
                RouterSpec(8, 2, renormalize=True), False),
    "qwen3-norm": ("qwen3_moe:Qwen3MoeConfig/Qwen3MoeTopKRouter",
                   dict(num_experts=8, num_experts_per_tok=3, norm_topk_prob=True),
                   RouterSpec(8, 3, renormalize=True), False),
    "qwen2-no-norm": ("qwen2_moe:Qwen2MoeConfig/Qwen2MoeTopKRouter",
                      dict(num_experts=8, num_experts_per_tok=4, norm_topk_prob=False),
                      RouterSpec(8, 4), False),
    "granite": ("granitemoe:GraniteMoeConfig/GraniteMoeTopKRouter",
                dict(num_local_experts=8, num_experts_per_tok=2),
                RouterSpec(8, 2, scoring="softmax_topk"), False),
    "gpt-oss": ("gpt_oss:GptOssConfig/GptOssTopKRouter",
                dict(num_local_experts=8, num_experts_per_tok=4),
                RouterSpec(8, 4, scoring="softmax_topk"), False),
    "minimax-m2": ("minimax_m2:MiniMaxM2Config/MiniMaxM2TopKRouter",
                   dict(num_local_experts=8, num_experts_per_tok=2),
                   RouterSpec(8, 2, scoring="sigmoid", renormalize=True, correction_bias=True),
                   True),
    "deepseek-v3": ("deepseek_v3:DeepseekV3Config/DeepseekV3TopkRouter",
                    dict(n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                         norm_topk_prob=True, routed_scaling_factor=2.5),
                    RouterSpec(8, 3, scoring="sigmoid", renormalize=True, correction_bias=True,
                               num_groups=4, topk_groups=2, routed_scaling_factor=2.5), True),
    "glm4-moe-no-norm": ("glm4_moe:Glm4MoeConfig/Glm4MoeTopkRouter",
                         dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                              norm_topk_prob=False, routed_scaling_factor=1.0),
                         RouterSpec(8, 2, scoring="sigmoid", correction_bias=True, num_groups=2,
                                    topk_groups=1), True),
    "deepseek-v2-groups": ("deepseek_v2:DeepseekV2Config/DeepseekV2TopkRouter",
                           dict(n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                                topk_group=2, topk_method="group_limited_greedy",
                                routed_scaling_factor=0.5),
                           RouterSpec(8, 2, num_groups=4, topk_groups=2, group_score="max",
                                      routed_scaling_factor=0.5, topk_sorted=False), False),
    "deepseek-v2-greedy": ("deepseek_v2:DeepseekV2Config/DeepseekV2TopkRouter",
                           dict(n_routed_experts=8, num_experts_per_tok=3, topk_method="greedy"),
                           RouterSpec(8, 3, topk_sorted=False), False),
}  # fmt: skip


@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize("family", list(ROUTERS))
def test_router_chooses_the_experts_and_weights_of_transformers(family, kind):
    name, config, spec, with_bias = ROUTERS[family]
    logits = _logits(kind)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(NUM_EXPERTS, generator=gen) if with_bias else None
    if bias is not None and kind == "ties":
        bias = bias.round()  # keeps ties among the biased scores
    want_weights, want_ids = _hf_route(_hf_router(name, **config), logits, bias)
    weights, ids = select_experts(logits, spec, bias)
    assert torch.equal(ids, want_ids)
    assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_llama4_router_scores_equal_transformers(kind, top_k):
    """Llama 4: the sigmoid of each top-k logit, as a dense [tokens, experts] map (0 elsewhere)."""
    router = _hf_router(
        "llama4:Llama4TextConfig/Llama4Router", num_local_experts=8, num_experts_per_tok=top_k
    )
    logits = _logits(kind)
    with torch.no_grad():
        want = router(logits)[0]  # [num_tokens, num_experts]
    weights, ids = select_experts(logits, RouterSpec(8, top_k, scoring="sigmoid_topk"))
    assert torch.equal(torch.zeros_like(want).scatter_(1, ids, weights), want)


def _direct_grouped_route(row: list[float], bias: list[float], spec: RouterSpec):
    """One token's grouped sigmoid routing, written out with Python lists (no ties in `row`)."""
    scores = [1 / (1 + torch.exp(torch.tensor(-v)).item()) for v in row]
    choice = [s + b for s, b in zip(scores, bias)]
    size = spec.num_experts // spec.num_groups
    groups = [sorted(choice[g * size : (g + 1) * size])[-2:] for g in range(spec.num_groups)]
    best = sorted(range(spec.num_groups), key=lambda g: -sum(groups[g]))[: spec.topk_groups]
    eligible = [e for e in range(spec.num_experts) if e // size in best]
    chosen = sorted(eligible, key=lambda e: -choice[e])[: spec.top_k]
    total = sum(scores[e] for e in chosen)
    return sorted(chosen), {e: scores[e] / total * spec.routed_scaling_factor for e in chosen}


def test_grouped_sigmoid_routing_equals_a_direct_computation():
    spec = ROUTERS["deepseek-v3"][2]
    logits, bias = _logits("random"), torch.randn(NUM_EXPERTS) * 0.3
    weights, ids = select_experts(logits, spec, bias)
    for t in range(NUM_TOKENS):
        chosen, want = _direct_grouped_route(logits[t].tolist(), bias.tolist(), spec)
        assert sorted(ids[t].tolist()) == chosen
        for e, w in zip(ids[t].tolist(), weights[t].tolist()):
            assert w == pytest.approx(want[e], rel=1e-5)


def test_router_spec_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="top_k"):
        RouterSpec(4, 5)
    with pytest.raises(ValueError, match="groups"):
        RouterSpec(8, 2, num_groups=3)
    with pytest.raises(ValueError, match="scoring"):
        RouterSpec(8, 2, scoring="relu")
    with pytest.raises(ValueError, match="top_k=1"):
        MoESpec(RouterSpec(8, 2), 16, apply_router_weight_on_input=True)


def _expert(x, w13, w2, b13, b2, act):
    h = F.linear(x, w13, b13)
    return F.linear(act(h), w2, b2)


@pytest.mark.parametrize("act", [ExpertActivation("silu"), ExpertActivation("gelu_tanh"),
                                 ExpertActivation("swiglu_oai", 1.702, 0.5)])  # fmt: skip
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("num_tokens", [NUM_TOKENS, 2])  # 2: decode-sized runs (CPU matvec)
def test_grouped_expert_products_equal_a_loop_over_tokens(act, bias, num_tokens):
    gen = torch.Generator().manual_seed(2)
    hidden, inter, top_k = 16, 12, 3
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(NUM_EXPERTS, 2 * inter, hidden, generator=gen)
    w2 = torch.randn(NUM_EXPERTS, hidden, inter, generator=gen)
    b13 = torch.randn(NUM_EXPERTS, 2 * inter, generator=gen) if bias else None
    b2 = torch.randn(NUM_EXPERTS, hidden, generator=gen) if bias else None
    weights = torch.rand(num_tokens, top_k, generator=gen)
    ids = torch.stack([torch.randperm(NUM_EXPERTS, generator=gen)[:top_k] for _ in x])
    ids[::5, 0] = -1  # experts another rank holds
    got = fused_experts(x, w13, w2, weights, ids, act, b13, b2)
    want = torch.zeros_like(x)
    for t in range(num_tokens):
        for k, e in enumerate(ids[t].tolist()):
            if e >= 0:
                b = (None, None) if not bias else (b13[e], b2[e])
                want[t] += weights[t, k] * _expert(x[t], w13[e], w2[e], *b, act)
    assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_a_decode_token_reads_only_the_experts_it_chose():
    """Experts it did not choose hold NaN: any read of theirs would poison the output."""
    moe = FusedMoE(16, MoESpec(RouterSpec(NUM_EXPERTS, 2, renormalize=True), 12))
    torch.nn.init.normal_(moe.gate.weight)
    x = torch.randn(1, 16)
    _, ids = moe.route(x)
    with torch.no_grad():
        moe.w13_weight.normal_()
        moe.w2_weight.normal_()
        unchosen = [e for e in range(NUM_EXPERTS) if e not in ids[0].tolist()]
        moe.w13_weight[unchosen] = float("nan")
        moe.w2_weight[unchosen] = float("nan")
    assert torch.isfinite(moe(x)).all()


def test_weight_loader_takes_expert_parts_fused_and_stacked():
    hidden, inter = 8, 6
    spec = MoESpec(RouterSpec(4, 2), inter, expert_bias=True)
    gate, up = torch.randn(4, inter, hidden), torch.randn(4, inter, hidden)
    down, b13, b2 = torch.randn(4, hidden, inter), torch.randn(4, 2 * inter), torch.randn(4, hidden)
    by_part, stacked = FusedMoE(hidden, spec), FusedMoE(hidden, spec)
    for e in range(4):
        for part, tensor in (("gate", gate[e]), ("up", up[e])):
            by_part.w13_weight.weight_loader(by_part.w13_weight, tensor, (part, e))
        by_part.w2_weight.weight_loader(by_part.w2_weight, down[e], ("down", e))
        by_part.w13_bias.weight_loader(by_part.w13_bias, b13[e], ("gate_up", e))
        by_part.w2_bias.weight_loader(by_part.w2_bias, b2[e], ("down", e))
    stacked.w13_weight.weight_loader(
        stacked.w13_weight, torch.cat([gate, up], 1), ("gate_up", None)
    )
    stacked.w2_weight.weight_loader(stacked.w2_weight, down, ("down", None))
    for model in (by_part, stacked):
        assert torch.equal(model.w13_weight, torch.cat([gate, up], 1))
        assert torch.equal(model.w2_weight, down)
    assert torch.equal(by_part.w13_bias, b13) and torch.equal(by_part.w2_bias, b2)
    loader = by_part.w13_weight.weight_loader
    with pytest.raises(ValueError, match="does not load"):
        loader(by_part.w13_weight, down[0], ("down", 0))
    with pytest.raises(ValueError, match="shape"):
        loader(by_part.w13_weight, gate[0].T, ("gate", 0))
    with pytest.raises(ValueError, match="shard_id"):
        loader(by_part.w13_weight, gate[0], "gate")


@pytest.mark.parametrize("name, want", [
    ("model.layers.3.mlp.experts.7.gate_proj.weight",
     ("model.layers.3.mlp.w13_weight", ("gate", 7))),
    ("model.layers.0.block_sparse_moe.experts.12.w2.weight",
     ("model.layers.0.block_sparse_moe.w2_weight", ("down", 12))),
    ("m.experts.1.w3.bias", ("m.w13_bias", ("up", 1))),
    ("model.layers.0.mlp.shared_expert.gate_proj.weight", None),
])  # fmt: skip
def test_expert_checkpoint_names_map_to_stacked_parameters(name, want):
    assert map_expert_name(name) == want


def test_the_shared_expert_is_added_gated_by_a_sigmoid():
    hidden = 8
    spec = MoESpec(RouterSpec(4, 1), 6, shared_intermediate_size=10, shared_gate=True)
    moe = FusedMoE(hidden, spec)
    for p in moe.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(5, hidden)
    weights, ids = moe.route(x)
    routed = fused_experts(x, moe.w13_weight, moe.w2_weight, weights, ids)
    shared = moe.shared_expert.down_proj.weight
    gate_up = moe.shared_expert.gate_up_proj.weight
    h = F.linear(x, gate_up)
    expected = F.linear(F.silu(h[:, :10]) * h[:, 10:], shared)
    expected = torch.sigmoid(F.linear(x, moe.shared_expert_gate.weight)) * expected
    assert_close(moe(x), routed + expected, rtol=1e-5, atol=1e-5)
