"""DeepSeek V2/V3 on CUDA (the Triton MLA decode and latent cache write, expanded prefill, CUDA
graphs for decode) against transformers on the CPU, in float32: paged logprobs in mixed batches and
greedy tokens. On the device: `pytest -m gpu tests/gpu/test_deepseek_cuda.py`."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_zoo_cuda import CUDA_LOGPROB_ATOL
from tests.models.test_deepseek import make_deepseek
from tests.models.zoo_harness import check_greedy, check_paged_logits, make_runner_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("name", ["v3-q-lora", "v2-no-q-lora-yarn", "v3-moe"])
def test_deepseek_on_cuda_matches_transformers(tmp_path, name):
    hf = make_deepseek(tmp_path, name)
    check_paged_logits(hf, make_runner_for(str(tmp_path), "cuda"), atol=CUDA_LOGPROB_ATOL)
    check_greedy(hf, tmp_path, device="cuda")
