"""Quantized linear methods on CUDA take their kernels (the Triton dequant GEMM for GPTQ, AWQ and
compressed-tensors W4A16/W8A16; torch._scaled_mm for per-channel fp8; the Triton fp8 block GEMM)
and give the CPU reference path's results (dequantize-then-matmul), at decode and prefill sizes.
Needs a real CUDA device (the methods choose kernels by the weights' device)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from paphos.layers.linear import ReplicatedLinear
from paphos.quant.awq import AWQLinearMethod
from paphos.quant.gptq import GPTQLinearMethod
from paphos.quant.scaled import ScaledLinearMethod
from paphos.quant_schemes import ActivationScheme, LinearScheme, WeightScheme, runtime_scheme
from tests.gpu.conftest import rel_error

sys.path.insert(0, str(Path(__file__).parents[1] / "quant"))
pytestmark = pytest.mark.gpu
IN, OUT = 256, 192


def _cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("the methods pick their kernels on CUDA weights: needs a CUDA device")
    return torch.device("cuda")


def _gptq(desc_act: bool):
    from test_gptq import gptq_quantize

    dense = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0)) * 0.1
    tensors, _ = gptq_quantize(dense, 4, 32, desc_act, True, seed=1)
    return lambda: GPTQLinearMethod(4, 32, desc_act), tensors


def _awq():
    from test_awq import awq_quantize

    dense = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(2)) * 0.1
    tensors, _ = awq_quantize(dense, 32)
    return lambda: AWQLinearMethod(32), tensors


def _packed(bits: int, symmetric: bool):
    gen = torch.Generator().manual_seed(3)
    scheme = LinearScheme(WeightScheme("int", bits, 32, symmetric=symmetric, packed=True))
    words = torch.randint(-(2**31), 2**31 - 1, (OUT, IN * bits // 32), generator=gen)
    tensors = {"weight_packed": words.int(), "weight_scale": torch.rand(OUT, IN // 32) * 0.01}
    tensors["weight_shape"] = torch.tensor([OUT, IN])
    if not symmetric:
        zeros = torch.randint(-(2**31), 2**31 - 1, (OUT * bits // 32, IN // 32), generator=gen)
        tensors["weight_zero_point"] = zeros.int()
    return lambda: ScaledLinearMethod(scheme), tensors


def _fp8(block: bool):
    gen = torch.Generator().manual_seed(4)
    if block:
        weights = WeightScheme(
            "float", column_block=128, row_block=128, scale_name="weight_scale_inv"
        )
        acts = ActivationScheme("float", "group", 128, half_range=448.0)
        scales = torch.rand(-(-OUT // 128), IN // 128, generator=gen) * 0.01
    else:
        weights, acts = WeightScheme("float"), ActivationScheme("float", "token", half_range=448.0)
        scales = torch.rand(OUT, 1, generator=gen) * 0.01
    values = (torch.randn(OUT, IN, generator=gen) * 50).to(torch.float8_e4m3fn)
    name = weights.scale_name
    return lambda: ScaledLinearMethod(LinearScheme(weights, acts)), {"weight": values, name: scales}


CASES = {
    "gptq": lambda: _gptq(False),
    "gptq-act-order": lambda: _gptq(True),
    "awq": _awq,
    "ct-w4a16-sym": lambda: _packed(4, True),
    "ct-w4a16-asym": lambda: _packed(4, False),
    "ct-w8a16": lambda: _packed(8, True),
    "fp8-channel": lambda: _fp8(False),
    "fp8-block": lambda: _fp8(True),
}


def _layer(make_method, tensors, device, dtype):
    with torch.device(device):
        layer = ReplicatedLinear(IN, OUT, linear_method=make_method(), params_dtype=dtype)
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, tensor.to(device))
    layer.linear_method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 64])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_method_equals_cpu_reference(case, m, dtype):
    device = _cuda()
    make_method, tensors = CASES[case]()
    cpu, gpu = (
        _layer(make_method, tensors, "cpu", dtype),
        _layer(make_method, tensors, device, dtype),
    )
    x = torch.randn(m, IN, generator=torch.Generator().manual_seed(m)).to(dtype)
    want = cpu(x.float()).float()  # fp32 reference of the same weights (and activation quant)
    got = gpu(x.to(device)).float().cpu()
    assert rel_error(got, want) < (2e-2 if dtype == torch.bfloat16 else 5e-3), case
    if case.startswith(("gptq", "awq", "ct-w")):  # the Triton kernel ran, not the reference
        assert gpu.group_gemm is not None


def test_runtime_fp8_on_cuda_uses_scaled_mm_and_equals_reference():
    device = _cuda()
    dense = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(5)) * 0.1
    layers = []
    for where in ("cpu", device):
        with torch.device(where):
            layer = ReplicatedLinear(IN, OUT, linear_method=ScaledLinearMethod(
                runtime_scheme("fp8", False)), params_dtype=torch.bfloat16)  # fmt: skip
        layer.weight.weight_loader(layer.weight, dense.to(where, torch.bfloat16))
        layer.linear_method.process_weights_after_loading(layer)
        layers.append(layer)
    assert layers[1].linear_method._takes_fp8_product(layers[1])
    x = torch.randn(7, IN, generator=torch.Generator().manual_seed(6)).bfloat16()
    want = layers[0](x.float())
    assert rel_error(layers[1](x.to(device)).float().cpu(), want) < 2e-2


def test_default_gguf_runs_kept_quantized_on_cuda():
    """The default SmolLM2 Q4_1 file on CUDA keeps its blocks (the Triton dequant GEMM) and
    scores its prompts as the same file dequantized at load does (teacher-forced prompt logprobs,
    so no greedy divergence compounds). The two are not bit-equal: the kept path's tied Q8_0 LM
    head multiplies float32 hidden states by exact float32 weights, the dequantized one float16
    by float16 (d * q rounded), and their GEMMs sum in other orders; greedy continuations of
    these random-token prompts may then part at a near tie, so only their first tokens are
    compared, for 3 prompts of 4."""
    import numpy as np

    from paphos import LLM, SamplingParams
    from paphos.config import default_model_path

    _cuda()
    prompts = [list(range(100 + 7 * i, 124 + 7 * i)) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=16, min_tokens=16, prompt_logprobs=1)
    tokens, logprobs = {}, {}
    for quantization in ("auto", "none"):
        kwargs = dict(device="cuda", dtype="float16", skip_tokenizer_init=True, max_num_seqs=4)
        with LLM(model=default_model_path(), quantization=quantization, **kwargs) as llm:
            method = llm.engine.config.model.quant_method
            assert method == ("gguf" if quantization == "auto" else None)
            got = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        tokens[quantization] = [o.outputs[0].token_ids for o in got]
        logprobs[quantization] = np.array(
            [
                [e[p[i]].logprob for i, e in enumerate(o.prompt_logprobs) if e]
                for o, p in zip(got, prompts)
            ]
        )  # [prompts, 23]
    np.testing.assert_allclose(logprobs["auto"], logprobs["none"], atol=0.1, rtol=0)
    same = [a[:4] == b[:4] for a, b in zip(tokens["auto"], tokens["none"])]
    assert sum(same) >= 3, (tokens["auto"], tokens["none"])
