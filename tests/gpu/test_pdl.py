"""Programmatic dependent launch (paphos.kernels.pdl): a CUDA graph of many short dependent
kernels launched with PDL gives bitwise the results of the same kernels launched without it
(a kernel reading its input before the previous kernel finished would show as a mismatch), and
PDL is on by default where the hardware has it."""

from __future__ import annotations

import pytest
import torch

from paphos.ops import dense

pytestmark = pytest.mark.gpu


def _needs_hopper() -> None:
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("PDL is a CUDA launch attribute")
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs sm90 or later")


@pytest.fixture
def pdl_switch(monkeypatch):
    """set(on): turn PDL on or off for the kernels launched next."""

    _needs_hopper()
    from paphos.kernels import pdl

    def set_pdl(on: bool) -> None:
        monkeypatch.setenv("PAPHOS_PDL", "1" if on else "0")
        pdl._enabled_on.cache_clear()

    yield set_pdl
    pdl._enabled_on.cache_clear()


def test_pdl_is_on_by_default_on_hopper_and_off_when_asked(pdl_switch):
    from paphos.kernels import pdl

    cuda = torch.device("cuda")
    pdl_switch(True)
    assert pdl.pdl_options(cuda) == {"USE_PDL": True, "launch_pdl": True}
    pdl_switch(False)
    assert pdl.pdl_options(cuda) == {"USE_PDL": False}
    assert pdl.pdl_options(torch.device("cpu")) == {"USE_PDL": False}


def _layers(rows: int, hidden: int, inter: int, num_layers: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(rows * 1000 + num_layers)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to("cuda", torch.bfloat16)

    return [
        {
            "norm1": 1 + rand(hidden, scale=0.1),
            "up": rand(2 * inter, hidden, scale=hidden**-0.5),
            "down": rand(hidden, inter, scale=inter**-0.5),
            "norm2": 1 + rand(hidden, scale=0.1),
        }
        for _ in range(num_layers)
    ]


def _chain(x: torch.Tensor, layers: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """A decoder-MLP-like chain: every kernel reads what the one before it just wrote."""
    from paphos.kernels.activation import silu_and_mul
    from paphos.kernels.rms_norm import fused_add_rms_norm, rms_norm

    residual = x
    hidden = rms_norm(x, layers[0]["norm1"], 1e-5)
    for i, layer in enumerate(layers):
        if i:
            hidden, residual = fused_add_rms_norm(hidden, residual, layer["norm1"], 1e-5)
        hidden = dense.linear(silu_and_mul(dense.linear(hidden, layer["up"])), layer["down"])
        hidden, residual = fused_add_rms_norm(hidden, residual, layer["norm2"], 1e-5)
    return hidden


@pytest.mark.parametrize("rows", [1, 8, 64])  # GEMV, skinny GEMM (one tile of rows each)
def test_dependent_kernels_in_a_cuda_graph_match_launches_without_pdl(pdl_switch, rows):
    layers = _layers(rows, hidden=256, inter=384, num_layers=24)
    inputs = [
        torch.randn(rows, 256, generator=torch.Generator().manual_seed(s)).to("cuda").bfloat16()
        for s in range(8)
    ]
    pdl_switch(False)
    expected = [_chain(x, layers) for x in inputs]  # also picks each shape's GEMM once
    pdl_switch(True)
    static_in = inputs[0].clone()
    _chain(static_in, layers)  # compile the PDL variants outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _chain(static_in, layers)
    for x, want in zip(inputs, expected):
        static_in.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, want)
