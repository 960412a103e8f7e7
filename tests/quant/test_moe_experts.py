"""Quantized routed experts (layers/moe_experts.py): tiny random MoE checkpoints made here, their
experts quantized from each format's description or by its own tools, against transformers
running the dequantized weights (logprobs 2e-4 in float32, greedy tokens equal):
- gpt-oss MXFP4 (tests/quant/mxfp4_checkpoint.py), against transformers' own
  `Mxfp4Config(dequantize=True)` load of the same checkpoint;
- Qwen3-MoE compressed-tensors pack-quantized W4A16 (llm-compressor's per-expert layout, written
  by compressed-tensors' compressor: tests/quant/ct_checkpoints.py).
Also: experts stay packed and a decode step reads only its experts' blocks; the CUDA plan
(dequantized at load) equals the kept experts; TP=2 and EP=2 equal one rank; refusals name the
format."""

from __future__ import annotations

import dataclasses
import multiprocessing
import sys
import traceback
from pathlib import Path

import pytest
import torch
import transformers
from torch.testing import assert_close

from paphos.layers import moe as moe_layer
from paphos.layers.moe import FusedMoE, MoESpec
from paphos.layers.moe_experts import PerExpertMoEMethod, moe_method_for
from paphos.ops.moe import RouterSpec
from paphos.parallel import destroy_distributed, init_distributed
from paphos.quant.mxfp4 import Mxfp4LinearMethod
from paphos.runner.model_runner import ModelRunner
from tests.engine.test_tensor_parallel import (
    TIMEOUT_S,
    _free_port,
    _runner_config,
    no_process_left_behind,  # noqa: F401 - autouse: no rank process survives a test
    prefill_then_decode_logits,
)
from tests.models.test_zoo_moe import CASES, make_tiny_moe
from tests.models.zoo_harness import check_greedy, check_paged_logits, make_runner
from tests.quant.mxfp4_checkpoint import write_mxfp4_gpt_oss

sys.path.insert(0, str(Path(__file__).parent))
from ct_checkpoints import write_compressed_moe  # noqa: E402

GPT_OSS = CASES["gpt-oss"]
# intermediate sizes whose halves are whole MXFP4 blocks / W4 groups of 32 (for TP=2)
GPT_OSS_TP = (GPT_OSS[0], {**GPT_OSS[1], "intermediate_size": 128})
QWEN3_MOE = ("Qwen3MoeConfig", {**CASES["qwen3-moe"][1], "moe_intermediate_size": 64})


def _mxfp4_dir(path: Path, case=GPT_OSS) -> Path:
    write_mxfp4_gpt_oss(make_tiny_moe(path, case[0], **case[1]), path)
    return path


def _ct_moe(path: Path, scheme: str = "w4a16-g32-sym") -> torch.nn.Module:
    """Writes the checkpoint; returns transformers with its dequantized weights."""
    hf = make_tiny_moe(path, QWEN3_MOE[0], **QWEN3_MOE[1])
    return write_compressed_moe(hf, path, scheme)


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory):
    """(checkpoint dir, transformers' own dequantized load of it)."""
    path = _mxfp4_dir(tmp_path_factory.mktemp("mxfp4"))
    config = transformers.Mxfp4Config(dequantize=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, dtype=torch.float32
    )
    hf.config._attn_implementation = "eager"
    return path, hf.eval()


@pytest.fixture(scope="module", params=["w4a16-g32-sym", "w4a16-g32-asym"])
def ct_moe(request, tmp_path_factory):
    """(checkpoint dir, transformers with the dequantized weights)."""
    path = tmp_path_factory.mktemp(f"ct-moe-{request.param}")
    return path, _ct_moe(path, request.param).eval()


def _moe_layers(runner: ModelRunner) -> list[FusedMoE]:
    return [m for m in runner.model.modules() if isinstance(m, FusedMoE)]


# ---- gpt-oss MXFP4 ---------------------------------------------------------------------------


def test_mxfp4_logprobs_match_transformers_dequantized(mxfp4):
    path, hf = mxfp4
    runner = make_runner(path)
    for layer in _moe_layers(runner):  # kept as blocks: no dense expert weights anywhere
        assert not hasattr(layer, "w13_weight")
        blocks = layer.experts["0"].gate_up_proj.blocks
        assert blocks.dtype == torch.uint8 and tuple(blocks.shape) == (2 * 96, 64 // 32, 16)
    check_paged_logits(hf, runner)


def test_mxfp4_greedy_tokens_equal_transformers(mxfp4):
    path, hf = mxfp4
    check_greedy(hf, path)


def test_mxfp4_start_up_bytes_count_the_blocks(mxfp4):
    path, _ = mxfp4
    layer = _moe_layers(make_runner(path))[0]
    # per expert: (2I x H + H x I) / 2 bytes of values, 1 byte per 32 of scales; f32 biases
    values = 3 * 96 * 64
    want = 4 * (values // 2 + values // 32) + 4 * 4 * (2 * 96 + 64)
    assert layer.expert_bytes() == want
    assert moe_layer.experts_format(make_runner(path).model) == "Mxfp4 (kept quantized)"


def test_decode_reads_only_the_chosen_experts(mxfp4):
    """Scales of 255 (E8M0's NaN: 2^128 = inf, times 0 = NaN) in every expert but the chosen
    ones: the output stays finite."""
    path, _ = mxfp4
    layer = _moe_layers(make_runner(path))[0]
    with torch.no_grad():
        for expert in ("1", "3"):
            for linear in (layer.experts[expert].gate_up_proj, layer.experts[expert].down_proj):
                linear.scales.fill_(255)
    x = torch.randn(1, 64)
    ids, weights = torch.tensor([[0, 2]]), torch.tensor([[0.75, 0.25]])
    assert torch.isfinite(layer.moe_method.apply(layer, x, weights, ids)).all()
    assert not torch.isfinite(layer.moe_method.apply(layer, x, weights, ids + 1)).all()


def test_dequantized_at_load_equals_kept(mxfp4, ct_moe, monkeypatch):
    """CUDA's plan (experts dequantized at load into the dense stacked layout, then the fused
    kernel; here its CPU reference) == the experts kept quantized."""
    for path in (mxfp4[0], ct_moe[0]):
        kept = prefill_then_decode_logits(ModelRunner(_runner_config(path)))
        with monkeypatch.context() as patch:
            patch.setattr(
                moe_layer, "moe_method_for", lambda method, _: moe_method_for(method, "cuda")
            )
            runner = ModelRunner(_runner_config(path))
        layer = _moe_layers(runner)[0]
        assert "experts" not in layer._modules and layer.w13_weight.dtype == torch.float32
        for got, want in zip(prefill_then_decode_logits(runner), kept, strict=True):
            assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- compressed-tensors W4A16 (Qwen3-MoE) -----------------------------------------------------


def test_compressed_tensors_experts_match_dequantized_twin(ct_moe):
    path, hf = ct_moe
    runner = make_runner(path)
    layer = _moe_layers(runner)[0]
    assert layer.experts["3"].down_proj.weight_packed.dtype == torch.int32
    assert not hasattr(layer, "w13_weight")
    check_paged_logits(hf, runner)
    check_greedy(hf, path)


# ---- tensor and expert parallelism -------------------------------------------------------------


def _rank_main(rank: int, port: int, model_dirs: dict, results: multiprocessing.Queue) -> None:
    try:
        parallel = init_distributed(rank, 2, "gloo", f"tcp://127.0.0.1:{port}")
        out = {}
        for name, model_dir in model_dirs.items():
            for mode in ("tp", "ep"):
                config = _runner_config(Path(model_dir))
                config = dataclasses.replace(
                    config,
                    parallel=dataclasses.replace(
                        config.parallel, enable_expert_parallel=mode == "ep"
                    ),
                )
                runner = ModelRunner(config, parallel)
                layer = _moe_layers(runner)[0]
                held = sorted(int(e) for e in layer.experts)
                logits = [t.numpy() for t in prefill_then_decode_logits(runner)]
                out[name, mode] = held, logits
        results.put((rank, out, None))
    except BaseException:  # noqa: BLE001 - reported to the test process
        results.put((rank, None, traceback.format_exc()))
    finally:
        destroy_distributed()


def test_two_ranks_give_the_logits_of_one_rank(tmp_path):
    dirs = {"mxfp4": _mxfp4_dir(tmp_path / "mxfp4", GPT_OSS_TP), "ct-w4a16": tmp_path / "ct"}
    _ct_moe(dirs["ct-w4a16"])
    expected = {
        n: prefill_then_decode_logits(ModelRunner(_runner_config(d))) for n, d in dirs.items()
    }
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    args = {n: str(d) for n, d in dirs.items()}
    procs = [context.Process(target=_rank_main, args=(r, port, args, results)) for r in (0, 1)]
    try:
        for p in procs:
            p.start()
        by_rank = {}
        for _ in procs:
            rank, out, error = results.get(timeout=TIMEOUT_S * 2)
            assert error is None, f"rank {rank} failed:\n{error}"
            by_rank[rank] = out
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    for rank in (0, 1):
        for name in dirs:
            assert by_rank[rank][name, "tp"][0] == [0, 1, 2, 3]  # every expert, sliced
            assert by_rank[rank][name, "ep"][0] == [2 * rank, 2 * rank + 1]  # half, whole
            for mode in ("tp", "ep"):
                for got, want in zip(by_rank[rank][name, mode][1], expected[name], strict=True):
                    assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


# ---- refusals --------------------------------------------------------------------------------


class _NoExpertsMethod(Mxfp4LinearMethod):
    """A quantized dense-layer format that declares no per-expert support."""


def test_a_format_without_expert_support_is_refused_by_name():
    spec = MoESpec(RouterSpec(4, 2), intermediate_size=64)
    with pytest.raises(ValueError, match="format of _NoExpertsMethod are not supported"):
        FusedMoE(64, spec, _NoExpertsMethod())


def test_activation_quantized_experts_are_refused_on_cuda():
    from paphos import quant_schemes
    from paphos.quant.scaled import ScaledLinearMethod

    w8a8 = ScaledLinearMethod(quant_schemes.runtime_scheme("int8", w8a8=True))
    assert isinstance(moe_method_for(w8a8, "cpu"), PerExpertMoEMethod)
    with pytest.raises(ValueError, match="ScaledLinearMethod experts with quantized activations"):
        moe_method_for(w8a8, "cuda")
