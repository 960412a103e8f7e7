"""The Triton fused MoE (paphos.kernels.fused_moe) against its reference (ops.moe.fused_experts in
float64) on random inputs: 8-128 experts, top-k 1-8, 1-512 tokens, float16/bfloat16/float32,
biases, every activation, ids of -1 (another rank's experts); the sort-and-pad of slots by
expert; CUDA-graph capture and replay with new routing."""

from __future__ import annotations

import pytest
import torch

from paphos.ops.moe import ExpertActivation, fused_experts
from tests.gpu.conftest import interpreting, rel_error, skip_interpreted_bf16_dot

pytestmark = pytest.mark.gpu
TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}
# (experts, top_k, tokens)
SHAPES = [(8, 2, 1), (8, 1, 7), (16, 8, 33), (128, 8, 1), (128, 4, 64), (64, 6, 512), (8, 2, 512)]


def _operands(device, dtype, num_experts, top_k, num_tokens, hidden, inter, bias):  # noqa: ANN001, ANN202
    gen = torch.Generator().manual_seed(num_experts * 131 + top_k * 17 + num_tokens)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    b13 = torch.randn(num_experts, 2 * inter, generator=gen) if bias else None
    b2 = torch.randn(num_experts, hidden, generator=gen) if bias else None
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    weights, ids = scores.topk(top_k, dim=-1)
    ids[::3, -1] = -1  # held by another rank
    tensors = [x, w13, w2, weights, ids, b13, b2]
    return [None if t is None else t.to(device, dtype if t.is_floating_point() else t.dtype)
            for t in tensors]  # fmt: skip


def _sizes(device: torch.device) -> tuple[int, int]:
    return (32, 48) if interpreting() else (256, 320)  # (hidden, inter): inter not a tile multiple


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_experts, top_k, num_tokens", SHAPES)
def test_fused_moe_kernel_matches_the_reference(device, dtype, num_experts, top_k, num_tokens):
    from paphos.kernels.fused_moe import fused_experts as triton_experts

    skip_interpreted_bf16_dot(device, dtype)
    hidden, inter = _sizes(device)
    x, w13, w2, weights, ids, _, _ = _operands(
        device, dtype, num_experts, top_k, num_tokens, hidden, inter, False
    )
    out = triton_experts(x, w13, w2, weights, ids)
    ref = fused_experts(x.double(), w13.double(), w2.double(), weights.double(), ids)
    assert out.dtype == dtype and out.shape == (num_tokens, hidden)
    assert rel_error(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_slot", [True, False])
@pytest.mark.parametrize("num_experts, top_k, num_tokens", [(8, 2, 1), (128, 8, 2), (16, 4, 3)])
def test_per_slot_and_grouped_products_both_match_the_reference(
    device, dtype, per_slot, num_experts, top_k, num_tokens
):
    """Decode-sized batches: the per-slot GEMVs (the default up to 16 slots) and the grouped
    GEMMs give the reference's result, biases and the clamped SwiGLU included."""
    from paphos.kernels.fused_moe import fused_experts as triton_experts

    skip_interpreted_bf16_dot(device, dtype)
    hidden, inter = _sizes(device)
    x, w13, w2, weights, ids, b13, b2 = _operands(
        device, dtype, num_experts, top_k, num_tokens, hidden, inter, True
    )
    act = ExpertActivation("swiglu_oai", 1.702, 0.7)
    out = triton_experts(x, w13, w2, weights, ids, act, b13, b2, per_slot_products=per_slot)
    ref = fused_experts(
        x.double(), w13.double(), w2.double(), weights.double(), ids, act, b13.double(),
        b2.double(),
    )  # fmt: skip
    assert rel_error(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(
    "act", [ExpertActivation("gelu"), ExpertActivation("gelu_tanh"),
            ExpertActivation("swiglu_oai", 1.702, 0.7), ExpertActivation("swiglu_oai")],
)  # fmt: skip
def test_fused_moe_kernel_takes_biases_and_every_activation(device, dtype, act):
    from paphos.kernels.fused_moe import fused_experts as triton_experts

    hidden, inter = _sizes(device)
    x, w13, w2, weights, ids, b13, b2 = _operands(device, dtype, 8, 2, 19, hidden, inter, True)
    out = triton_experts(x, w13, w2, weights, ids, act, b13, b2)
    ref = fused_experts(
        x.double(), w13.double(), w2.double(), weights.double(), ids, act, b13.double(),
        b2.double(),
    )  # fmt: skip
    assert rel_error(out, ref) < TOL[dtype]


@pytest.mark.parametrize("num_experts, top_k, num_tokens", SHAPES)
@pytest.mark.parametrize("block_m", [16, 64])
def test_slots_are_grouped_by_expert_and_padded_per_block(
    device, num_experts, top_k, num_tokens, block_m
):
    from paphos.kernels.fused_moe import moe_align_block_size

    *_, ids, _, _ = _operands(device, torch.float32, num_experts, top_k, num_tokens, 8, 8, False)
    slots, block_experts = moe_align_block_size(ids, num_experts, block_m)
    num_slots = ids.numel()
    flat = ids.reshape(-1).cpu()
    slots, block_experts = slots.cpu().view(-1, block_m), block_experts.cpu()
    seen = []
    for block, expert in zip(slots.tolist(), block_experts.tolist()):
        real = [s for s in block if s < num_slots]
        if expert < 0:
            assert not real
            continue
        assert real and all(flat[s] == expert for s in real)
        seen += real
    assert sorted(seen) == sorted(i for i in range(num_slots) if flat[i] >= 0)  # each once
    active = block_experts[block_experts >= 0]
    assert torch.equal(active, active.sort().values)  # experts in order, blocks contiguous


def test_fused_moe_kernel_replays_in_a_cuda_graph_with_new_routing(device):
    from paphos.kernels.fused_moe import fused_experts as triton_experts

    if device.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    x, w13, w2, weights, ids, _, _ = _operands(device, torch.float16, 64, 4, 32, 256, 320, False)
    triton_experts(x, w13, w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_experts(x, w13, w2, weights, ids)
    new_ids = torch.randint(-1, 64, ids.shape, device=device)
    ids.copy_(new_ids)
    graph.replay()
    ref = fused_experts(x.double(), w13.double(), w2.double(), weights.double(), ids)
    assert rel_error(out, ref) < TOL[torch.float16]


def test_kernel_knows_every_expert_activation(device):
    from paphos.kernels.fused_moe import ACT_CODES
    from paphos.ops.moe import EXPERT_ACTIVATIONS

    assert set(ACT_CODES) == set(EXPERT_ACTIVATIONS)


@pytest.mark.parametrize("num_tokens", [1, 40])
def test_fused_moe_layer_with_the_kernel_equals_the_layer_with_the_reference(device, num_tokens):
    """FusedMoE as the models build it (router, shared expert, biases, clamped SwiGLU; Llama 4's
    input-scaled top-1): the Triton op in place of the reference changes nothing but rounding."""
    from paphos.kernels.fused_moe import fused_experts as triton_experts
    from paphos.layers.moe import FusedMoE, MoESpec
    from paphos.ops.moe import RouterSpec

    specs = [
        MoESpec(RouterSpec(8, 2, "sigmoid", True, True, num_groups=4, topk_groups=2), 48,
                ExpertActivation("swiglu_oai", limit=1.0), expert_bias=True, router_bias=True,
                shared_intermediate_size=32, shared_gate=True),
        MoESpec(RouterSpec(8, 1, scoring="sigmoid_topk"), 48, shared_intermediate_size=48,
                apply_router_weight_on_input=True),
    ]  # fmt: skip
    torch.manual_seed(0)
    for spec in specs:
        with torch.device(device):
            layer = FusedMoE(32, spec, params_dtype=torch.float32)
            for param in layer.parameters():
                torch.nn.init.normal_(param, std=0.3)
            x = torch.randn(num_tokens, 32)
        want = layer(x)
        layer.fused_experts_op = triton_experts
        assert rel_error(layer(x), want) < TOL[torch.float32]
