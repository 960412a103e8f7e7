"""The configurable decoder's families on CUDA (Triton attention with sliding windows, soft-caps
and head sizes 16..32, CUDA graphs for decode) against transformers on the CPU, in float32:
paged logprobs in mixed batches and greedy tokens. On the device:
`pytest -m gpu tests/gpu/test_zoo_cuda.py`."""

from __future__ import annotations

import inspect

import pytest
import torch

from tests.models import test_sliding_window_blocks as sliding
from tests.models.test_hybrid import CASES as HYBRID_CASES
from tests.models.test_zoo import CASES
from tests.models.test_zoo_moe import CASES as MOE_CASES
from tests.models.test_zoo_moe import make_tiny_moe
from tests.models.zoo_harness import (
    check_greedy,
    check_paged_logits,
    make_runner_for,
    make_tiny_model,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA_LOGPROB_ATOL = 1e-3  # float32 Triton attention (IEEE dots), another summation order
CUDA_CASES = [
    "qwen2-window-1kv",
    "qwen3-head-dim",
    "mistral-window",
    "gemma2",
    "gemma3",
    "gemma4",
    "olmo3",
    "stablelm-parallel-qknorm",
    "cohere2",
    "ministral3",
]


def _grouped_gated_norm(module) -> bool:
    """Whether a transformers modeling module's gated RMSNorm takes a `group_size`."""
    norms = [v for k, v in vars(module).items() if k.endswith("RMSNormGated")]
    return all("group_size" in inspect.signature(n.__init__).parameters for n in norms)


def without_reference_quirks(name: str, overrides: dict) -> dict:
    """The device's transformers may be older than CI's, with fixes missing in its reference
    modules: its Mamba2 gated RMSNorms (before they took `group_size`) normalize over all groups
    at once, its NemotronH floors dt at `time_step_min` instead of `time_step_limit`'s 0, and its
    gpt-oss experts ignore `swiglu_limit` (7.0 always). paphos follows the fixed
    definitions, so on such a transformers these cases run with the settings where both agree
    (one group; the default limit) instead of failing on the reference's bug."""
    from transformers.models.gpt_oss import modeling_gpt_oss
    from transformers.models.granitemoehybrid import modeling_granitemoehybrid
    from transformers.models.mamba2 import modeling_mamba2
    from transformers.models.nemotron_h import modeling_nemotron_h

    if name == "mamba2" and not _grouped_gated_norm(modeling_mamba2):
        return {**overrides, "n_groups": 1}
    if name == "granite_moe_hybrid" and not _grouped_gated_norm(modeling_granitemoehybrid):
        return {**overrides, "mamba_n_groups": 1}
    mixer_source = inspect.getsource(modeling_nemotron_h.NemotronHMamba2Mixer.__init__)
    if name == "nemotron_h" and "config.time_step_min, float" in mixer_source:
        return {**overrides, "time_step_min": 1e-9}  # its dt floor, ~ time_step_limit's 0
    experts_source = inspect.getsource(modeling_gpt_oss.GptOssExperts.__init__)
    if name == "gpt-oss" and "swiglu_limit" not in experts_source:
        return {**overrides, "swiglu_limit": 7.0}
    return overrides


@pytest.mark.parametrize("name", CUDA_CASES)
def test_family_on_cuda_matches_transformers(tmp_path, name):
    config_class, overrides, _ = CASES[name]
    hf = make_tiny_model(tmp_path, config_class, **overrides)
    check_paged_logits(hf, make_runner_for(str(tmp_path), "cuda"), atol=CUDA_LOGPROB_ATOL)
    check_greedy(hf, tmp_path, device="cuda")


@pytest.mark.parametrize("name", list(MOE_CASES))
def test_moe_family_on_cuda_matches_transformers(tmp_path, name):
    """The MoE families with the Triton fused MoE (float32, IEEE dots) under CUDA graphs."""
    config_class, overrides = MOE_CASES[name]
    hf = make_tiny_moe(tmp_path, config_class, **without_reference_quirks(name, overrides))
    check_paged_logits(hf, make_runner_for(str(tmp_path), "cuda"), atol=CUDA_LOGPROB_ATOL)
    check_greedy(hf, tmp_path, device="cuda")


@pytest.mark.parametrize("name", sorted(HYBRID_CASES))
def test_hybrid_family_on_cuda_matches_transformers(tmp_path, name):
    """Hybrids: Triton state decode steps inside the captured decode graphs, prompt chunks by
    the Triton prefill kernels (conv1d, SSD, gated delta rule)."""
    config_class, overrides = HYBRID_CASES[name]
    hf = make_tiny_model(tmp_path, config_class, **without_reference_quirks(name, overrides))
    runner = make_runner_for(str(tmp_path), "cuda")
    assert runner.graphs is not None, "decode steps should replay CUDA graphs"
    check_paged_logits(hf, runner, atol=CUDA_LOGPROB_ATOL)
    check_greedy(hf, tmp_path, device="cuda")


@pytest.mark.parametrize("name", list(sliding.CASES))
def test_sliding_window_blocks_freed_on_cuda(tmp_path, name):
    """Triton attention reads the sliding groups' own block tables (null entries before the
    window) in eager steps and CUDA graph replays: exact, window-sized, tables in sync."""
    config_class, overrides = sliding.CASES[name]
    hf = make_tiny_model(tmp_path, config_class, **overrides)
    sliding.check_exact_with_blocks_freed(tmp_path, hf, "cuda", atol=CUDA_LOGPROB_ATOL)
    sliding.check_window_sized_generation(tmp_path, hf, "cuda")
