"""The GPT-style and Phi families and the transformers fallback on CUDA (Triton attention; CUDA
graphs for the native families' decode, eager for the fallback's), float32, against transformers
on the CPU: logprobs of a mixed prefill/decode batch, and greedy tokens of `LLM.generate`.
On the device: `pytest -m gpu tests/gpu/test_gpt_phi_fallback_cuda.py`.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.models.hf_compare import build_runner, check_greedy, check_mixed_batch, save_tiny
from tests.models.test_gpt_phi_families import CASES, GREEDY, _config
from tests.models.test_transformers_fallback import ARCHITECTURES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = dict(device="cuda", num_blocks_override=64)
ATOL = 2e-3  # float32 through the Triton kernels (their dots may round like TF32)

MODELS = {case: CASES[case] for case in GREEDY.values()}
MODELS.update({f"fallback_{a}": (f"{a}ForCausalLM", kw) for a, kw in ARCHITECTURES.items()})


@pytest.fixture(scope="module", params=list(MODELS))
def tiny(request, tmp_path_factory):
    arch, kwargs = MODELS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    impl = "transformers" if request.param.startswith("fallback_") else "paphos"
    return path, save_tiny(getattr(transformers, arch), _config(arch, kwargs), path), impl


def _runner_or_skip(path, impl):
    """The runner; a skip where this transformers version's class bypasses the attention
    interface (CodeGen did before 5.2x), which the fallback refuses with that reason."""
    try:
        return build_runner(path, model_impl=impl, device="cuda")
    except ValueError as e:
        if "never called transformers' attention interface" not in str(e):
            raise
        pytest.skip(f"transformers {transformers.__version__}: {e}")


def test_mixed_batch_logprobs_on_cuda_equal_transformers(tiny):
    path, hf, impl = tiny
    check_mixed_batch(hf, _runner_or_skip(path, impl), atol=ATOL)


def test_greedy_tokens_on_cuda_equal_hf_generate(tiny):
    path, hf, impl = tiny
    _runner_or_skip(path, impl)
    check_greedy(path, hf, model_impl=impl, **CUDA)
