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
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from torch.testing import assert_close

from paphos.config import EngineConfig
from paphos.layers import moe as moe_layer
from paphos.layers.moe import FusedMoE, MoESpec
from paphos.layers.moe_experts import PerExpertMoEMethod, moe_method_for
from paphos.ops.moe import RouterSpec
from paphos.quant.mxfp4 import MXFP4LinearMethod, dequantize_mxfp4
from paphos.runner.model_runner import ModelRunner
from tests.engine.test_tensor_parallel import (
    TIMEOUT_S,
    _runner_config,
    no_process_left_behind,  # noqa: F401 - autouse: no rank process survives a test
    prefill_then_decode_logits,
    run_on_two_ranks,
)
from tests.models.test_zoo_moe import CASES, make_tiny_moe
from tests.models.zoo_harness import (
    check_greedy,
    check_paged_logits,
    make_runner,
    make_runner_for,
)
from tests.quant.mxfp4_checkpoint import write_mxfp4_gpt_oss

sys.path.insert(0, str(Path(__file__).parent))
from ct_checkpoints import write_compressed_moe  # noqa: E402
from gguf_blocks import QUANTIZABLE, random_blocks  # noqa: E402
from moe_checkpoints import QUANTIZERS, write_per_expert_moe  # noqa: E402

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


def test_mxfp4_dequantization_is_transformers_bit_for_bit():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(100, 140, (3, 40, 4), dtype=torch.uint8, generator=gen)
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    for expert in range(3):
        got = dequantize_mxfp4(blocks[expert], scales[expert])  # [out, in]
        assert torch.equal(got, want[expert].T)


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


def test_mxfp4_start_up_bytes_count_the_blocks(mxfp4, caplog):
    path, _ = mxfp4
    with caplog.at_level(logging.INFO, logger="paphos.runner.model_runner"):
        runner = make_runner(path)
    assert "experts MXFP4 (kept quantized)" in caplog.text
    layer = _moe_layers(runner)[0]
    # per expert: (2I x H + H x I) / 2 bytes of values, 1 byte per 32 of scales; f32 biases
    values = 3 * 96 * 64
    want = 4 * (values // 2 + values // 32) + 4 * 4 * (2 * 96 + 64)
    assert layer.expert_bytes() == want


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


# ---- GPTQ and AWQ (AutoGPTQ / AutoAWQ per-expert layouts) ----------------------------------------


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_gptq_and_awq_experts_match_dequantized_twin(tmp_path, name):
    quantize, config = QUANTIZERS[name]
    hf = make_tiny_moe(tmp_path, QWEN3_MOE[0], **QWEN3_MOE[1])
    hf = write_per_expert_moe(hf, tmp_path, quantize, config).eval()
    runner = make_runner(tmp_path)
    assert _moe_layers(runner)[0].experts["1"].gate_up_proj.qweight.dtype == torch.int32
    check_paged_logits(hf, runner)


# ---- tensor and expert parallelism -------------------------------------------------------------


def _rank_logits(parallel, model_dirs: dict) -> dict:
    out = {}
    for name, model_dir in model_dirs.items():
        for mode in ("tp", "ep"):
            config = _runner_config(Path(model_dir))
            config = dataclasses.replace(
                config,
                parallel=dataclasses.replace(config.parallel, enable_expert_parallel=mode == "ep"),
            )
            runner = ModelRunner(config, parallel)
            layer = _moe_layers(runner)[0]
            held = sorted(int(e) for e in layer.experts)
            out[name, mode] = held, [t.numpy() for t in prefill_then_decode_logits(runner)]
    return out


def test_two_ranks_give_the_logits_of_one_rank(tmp_path):
    dirs = {"mxfp4": _mxfp4_dir(tmp_path / "mxfp4", GPT_OSS_TP), "ct-w4a16": tmp_path / "ct"}
    _ct_moe(dirs["ct-w4a16"])
    expected = {
        n: prefill_then_decode_logits(ModelRunner(_runner_config(d))) for n, d in dirs.items()
    }
    args = {n: str(d) for n, d in dirs.items()}
    by_rank = run_on_two_ranks(_rank_logits, args, timeout_s=TIMEOUT_S * 2)
    for rank in (0, 1):
        for name in dirs:
            assert by_rank[rank][name, "tp"][0] == [0, 1, 2, 3]  # every expert, sliced
            assert by_rank[rank][name, "ep"][0] == [2 * rank, 2 * rank + 1]  # half, whole
            for mode in ("tp", "ep"):
                for got, want in zip(by_rank[rank][name, mode][1], expected[name], strict=True):
                    assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


# ---- refusals --------------------------------------------------------------------------------


class _NoExpertsMethod(MXFP4LinearMethod):
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


# ---- GGUF (llama.cpp's stacked expert tensors) -----------------------------------------------

_GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}  # fmt: skip
_GGUF_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _llama_cpp_permute(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter's q/k row order for arch llama (interleaved pairs -> halves)."""
    head_dim = rows.shape[0] // num_heads
    split = rows.reshape(num_heads, 2, head_dim // 2, *rows.shape[1:])
    return split.swapaxes(1, 2).reshape(rows.shape)


def _write_gguf_metadata(writer, config, arch: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    if arch != "llama":
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    writer.add_expert_count(getattr(config, "num_experts", None) or config.num_local_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])


def write_moe_gguf(path: Path, hf: torch.nn.Module, arch: str, expert_type) -> torch.nn.Module:
    """`hf` (Qwen3-MoE, Qwen2-MoE or Mixtral) as llama.cpp's converter and llama-quantize write
    it (arch qwen3moe / qwen2moe / llama; experts as `blk.N.ffn_{gate,up,down}_exps.weight`
    [E, rows, cols] in `expert_type`, the rest F32; arch llama's q/k rows permuted); the
    dequantized experts are loaded back into `hf`: the twin the file means."""
    import gguf

    config = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    _write_gguf_metadata(writer, config, arch)
    rng = np.random.default_rng(0)

    def add_experts(name: str, values: torch.Tensor) -> torch.Tensor:
        """values [E, rows, cols] quantized (random valid blocks where the gguf package cannot
        quantize the type: the K-quants)."""
        num_experts, rows, cols = values.shape
        if expert_type in QUANTIZABLE:
            blocks = gguf.quants.quantize(values.numpy(), expert_type)  # [E, rows, row_bytes]
        else:
            blocks = random_blocks(expert_type, num_experts * rows, cols, rng, scale=5e-3)
            blocks = blocks.reshape(num_experts, rows, -1)
        writer.add_tensor(name, blocks, raw_dtype=expert_type)
        dense = gguf.quants.dequantize(blocks, expert_type)
        return torch.from_numpy(dense.reshape(values.shape).copy())

    with torch.no_grad():
        for name, tensor in hf.state_dict().items():
            module, suffix = name.rsplit(".", 1)
            values = tensor.detach().float()
            if module in _GGUF_TOP:
                writer.add_tensor(f"{_GGUF_TOP[module]}.{suffix}", values.numpy())
                continue
            _, _, layer, rest = module.split(".", 3)
            blk = f"blk.{layer}"
            if name.endswith(".experts.gate_up_proj"):
                gate, up = values.chunk(2, dim=1)  # [E, I, H] each
                gate = add_experts(f"{blk}.ffn_gate_exps.weight", gate.contiguous())
                up = add_experts(f"{blk}.ffn_up_exps.weight", up.contiguous())
                hf.get_parameter(name).copy_(torch.cat([gate, up], dim=1))
            elif name.endswith(".experts.down_proj"):
                down = add_experts(f"{blk}.ffn_down_exps.weight", values.contiguous())
                hf.get_parameter(name).copy_(down)
            else:
                if arch == "llama" and rest in ("self_attn.q_proj", "self_attn.k_proj"):
                    heads = config.num_attention_heads if "q_proj" in rest else None
                    heads = heads or config.num_key_value_heads
                    values = _llama_cpp_permute(values, heads)
                if rest == "mlp.shared_expert_gate":
                    values = values.reshape(-1)  # llama.cpp stores it [hidden]
                gguf_name = f"{blk}.{_GGUF_LAYER_NAMES[rest]}.{suffix}"
                writer.add_tensor(gguf_name, np.ascontiguousarray(values.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


# case -> (GGUF arch, transformers config, overrides: rows of whole blocks (K-quants: 256),
# expert type)
GGUF_CASES = {
    "qwen3moe-Q8_0": ("qwen3moe", QWEN3_MOE[0], {"norm_topk_prob": True}, "Q8_0"),
    "qwen3moe-Q4_K": (
        "qwen3moe", QWEN3_MOE[0],
        {"norm_topk_prob": True, "hidden_size": 256, "moe_intermediate_size": 256,
         "intermediate_size": 256},
        "Q4_K",
    ),
    "qwen2moe-Q8_0": ("qwen2moe", "Qwen2MoeConfig", {"mlp_only_layers": []}, "Q8_0"),
    "mixtral-Q5_1": ("llama", "MixtralConfig", {}, "Q5_1"),
}  # fmt: skip
_GGUF_BASE = {"qwen3moe": QWEN3_MOE[1], "qwen2moe": CASES["qwen2-moe"][1],
              "llama": CASES["mixtral"][1]}  # fmt: skip


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_experts_kept_match_the_dequantized_file(tmp_path, case):
    import gguf

    arch, config_class, extra, type_name = GGUF_CASES[case]
    overrides = {**_GGUF_BASE[arch], **extra}
    hf = make_tiny_moe(tmp_path / "hf", config_class, **overrides)
    path = tmp_path / f"tiny-{case}.gguf"
    hf = write_moe_gguf(path, hf, arch, gguf.GGMLQuantizationType[type_name]).eval()
    runner = make_runner_for(str(path))
    assert type(runner.model).__name__ == type(hf).__name__  # the config the file implies
    layer = _moe_layers(runner)[0]
    assert runner.config.model.quant_method == "gguf"
    parts = layer.experts["2"].down_proj.gguf_parts
    assert [p.ggml_type.name for p in parts] == [type_name]
    check_paged_logits(hf, runner)
    # --quantization none: the file dequantized at load into the dense stacked experts
    settings = dict(dtype="float32", skip_tokenizer_init=True, device="cpu", num_threads=1)
    settings |= dict(model=str(path), quantization="none", num_blocks_override=64)
    dense_runner = ModelRunner(EngineConfig.from_kwargs(**settings))
    assert _moe_layers(dense_runner)[0].w13_weight.dtype == torch.float32
    kept = prefill_then_decode_logits(ModelRunner(_runner_config(path)))
    for got, want in zip(prefill_then_decode_logits(dense_runner), kept, strict=True):
        assert_close(got, want, rtol=1e-4, atol=1e-4)  # fp32 sums in another order
