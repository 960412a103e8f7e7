"""Structured output on CUDA: the runner's pinned bitmask copies and the device mask, with CUDA
graphs, overlapped steps and multi-step decodes asked for, on the tiny random Llama (whose tokens
are noise, so only the mask makes outputs valid). On the device:
`pytest -m gpu tests/gpu/test_structured_cuda.py`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from paphos import LLM, SamplingParams
from tests.engine.test_structured_output import REGEX, SAMPLERS, _check, _workload

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
pytest.importorskip("xgrammar")


def test_constrained_batches_on_cuda(tiny_llama_dir: Path) -> None:
    llm = LLM(
        model=str(tiny_llama_dir),
        device="cuda",
        dtype="float32",
        max_model_len=256,
        gpu_memory_utilization=0.3,
        async_scheduling=True,
        num_scheduler_steps=4,
    )
    _check(llm, _workload())
    _check(llm, _workload(n=3)[:4])
    samplers = [
        SamplingParams(seed=0, max_tokens=20, structured_outputs={"regex": REGEX}, **sampler)
        for sampler in SAMPLERS
    ]
    _check(llm, samplers)
