"""Quantized MoE experts on CUDA (layers/moe_experts.py: dequantized at load through each
format's own CUDA product, then the fused Triton MoE kernel; decode in CUDA graphs) against
transformers running the dequantized weights on the CPU, float32: gpt-oss MXFP4, Qwen3-MoE GPTQ
(act-order) and AWQ experts. On the device: `pytest -m gpu tests/gpu/test_quantized_moe_cuda.py`
(no gguf or compressed-tensors package needed)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
import transformers

from paphos.layers.moe import FusedMoE
from tests.models.test_zoo_moe import CASES, make_tiny_moe
from tests.models.zoo_harness import check_greedy, check_paged_logits, make_runner_for
from tests.quant.mxfp4_checkpoint import write_mxfp4_gpt_oss

sys.path.insert(0, str(Path(__file__).parents[1] / "quant"))
from moe_checkpoints import QUANTIZERS, write_per_expert_moe  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA_LOGPROB_ATOL = 1e-3  # float32 Triton attention and MoE (IEEE dots), another summation order
QWEN3_MOE = ("Qwen3MoeConfig", {**CASES["qwen3-moe"][1], "moe_intermediate_size": 64})


def _mxfp4(path: Path) -> torch.nn.Module:
    gpt_oss = CASES["gpt-oss"]
    write_mxfp4_gpt_oss(make_tiny_moe(path, gpt_oss[0], **gpt_oss[1]), path)
    config = transformers.Mxfp4Config(dequantize=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=torch.float32, device_map="cpu"
    )
    hf.config._attn_implementation = "eager"
    return hf


def _per_expert(name: str):
    def make(path: Path) -> torch.nn.Module:
        quantize, config = QUANTIZERS[name]
        hf = make_tiny_moe(path, QWEN3_MOE[0], **QWEN3_MOE[1])
        return write_per_expert_moe(hf, path, quantize, config)

    return make


MAKERS = {"mxfp4": _mxfp4, "gptq": _per_expert("gptq"), "awq": _per_expert("awq")}


@pytest.mark.parametrize("name", list(MAKERS))
def test_quantized_experts_on_cuda_match_transformers(tmp_path, name, caplog):
    hf = MAKERS[name](tmp_path).eval()
    with caplog.at_level(logging.INFO):
        runner = make_runner_for(str(tmp_path), device="cuda")
    assert "dequantized at load" in caplog.text
    layer = next(m for m in runner.model.modules() if isinstance(m, FusedMoE))
    assert "experts" not in layer._modules and layer.w13_weight.is_cuda
    check_paged_logits(hf, runner, atol=CUDA_LOGPROB_ATOL)
    check_greedy(hf, tmp_path, device="cuda")  # decode steps replayed from CUDA graphs
