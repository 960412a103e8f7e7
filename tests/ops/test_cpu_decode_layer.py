"""The fused CPU decode layer (paphos/kernels/cpu/decoder_layer.c, one C call per layer) against the
model's unfused layers, which run the same C routines at the same ISA level: bitwise equal outputs
and caches over tiny random Llamas (bf16/fp32, GQA, with and without biases, 1..4 decode tokens,
contexts across blocks, block sizes 16 and 32), at this CPU's level and, in a child process under
PAPHOS_CPU_ISA, at each lower one; the path is taken for pure decode only; greedy tokens of the
engine are the same with it on and off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from paphos import LLM, SamplingParams
from paphos.attention import AttentionMetadata
from paphos.config import EngineConfig
from paphos.kernels.cpu import decoder_layer, isa, native
from paphos.layers import cpu_decode
from paphos.runner.model_runner import ModelRunner

pytestmark = pytest.mark.skipif(decoder_layer.load_library() is None, reason="C kernel not built")
DTYPES = [torch.bfloat16, torch.float32]
VARIANTS = {
    # hidden 72 and intermediate 72: matvec and SiLU both have scalar tails past their vectors
    "gqa_bias": dict(
        hidden_size=72,
        intermediate_size=72,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attention_bias=True,
        mlp_bias=True,
    ),
    "mha": dict(hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=2),
}
NUM_BLOCKS = 24


def _save_tiny_llama(path: Path, variant: str) -> None:
    config = LlamaConfig(
        vocab_size=101,
        num_hidden_layers=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        **VARIANTS[variant],
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(path)


@pytest.fixture(scope="module", params=list(VARIANTS))
def model_dir(request, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    _save_tiny_llama(path, request.param)
    return path


def _runner(path: Path, dtype: torch.dtype, block_size: int, **engine_kwargs) -> ModelRunner:
    config = EngineConfig.from_kwargs(
        model=str(path),
        dtype=str(dtype).removeprefix("torch."),
        skip_tokenizer_init=True,
        block_size=block_size,
        num_blocks_override=NUM_BLOCKS,
        device="cpu",
        **engine_kwargs,
    )
    runner = ModelRunner(config)
    runner.initialize_kv_cache(NUM_BLOCKS)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # HF zeroes biases and sets norms to 1: random values test more
        for param in runner.model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3 + (param.dim() == 1))
        for cache in runner.kv_caches:
            cache.copy_(torch.randn(cache.shape, generator=gen))
    runner.model.model.reset_fused_decode()
    return runner


def _decode_metadata(seq_lens: list[int], block_size: int, seed: int) -> tuple:
    """Positions and metadata of one decode token for each sequence, blocks shuffled."""
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-n // block_size) for n in seq_lens)
    tables = torch.stack(
        [torch.randperm(NUM_BLOCKS, generator=gen)[:width] for _ in seq_lens]
    )  # [num_seqs, width]
    positions = torch.tensor([n - 1 for n in seq_lens])  # [num_seqs]
    slots = tables[torch.arange(len(seq_lens)), positions // block_size] * block_size
    slots += positions % block_size  # [num_seqs]
    metadata = AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=torch.arange(len(seq_lens) + 1),
        seq_lens=torch.tensor(seq_lens),
        block_tables=tables,
        logits_indices=torch.arange(len(seq_lens)),
        max_query_len=1,
        max_seq_len=max(seq_lens),
    )
    return positions, metadata


def _unfused_layers(model, positions, ids, caches, metadata):
    hidden, residual = model.embed_tokens(ids), None
    for layer, cache in zip(model.layers, caches):
        hidden, residual = layer(positions, hidden, residual, cache, metadata)
    return hidden, residual


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("seq_lens", [[1], [17], [33, 2], [70, 16, 48], [5, 64, 97, 33]])
def test_fused_layers_equal_unfused_layers_bitwise(model_dir, dtype, block_size, seq_lens):
    _assert_fused_equals_unfused(_runner(model_dir, dtype, block_size), dtype, seq_lens)


@pytest.fixture(scope="module")
def blocks_dir(tmp_path_factory) -> Path:
    """The "mha" Llama (hidden 64, intermediate 96: whole 32-element blocks) for `-q q*_*`."""
    path = tmp_path_factory.mktemp("mha_for_blocks")
    _save_tiny_llama(path, "mha")
    return path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quantization", ["q4_0", "q4_1", "q5_1", "q8_0"])
def test_fused_layers_over_gguf_blocks_equal_unfused_layers_bitwise(
    blocks_dir, dtype, quantization
):
    runner = _runner(blocks_dir, dtype, 16, quantization=quantization)
    assert type(runner.model.model.layers[0].mlp.down_proj.linear_method).__name__ == (
        "GGUFLinearMethod"
    )
    _assert_fused_equals_unfused(runner, dtype, [5, 64, 97, 33])


def _assert_fused_equals_unfused(runner: ModelRunner, dtype: torch.dtype, seq_lens) -> None:
    block_size = runner.kv_caches[0].shape[2]
    model = runner.model.model
    positions, metadata = _decode_metadata(seq_lens, block_size, seed=len(seq_lens))
    ids = torch.randint(0, 101, (len(seq_lens),), generator=torch.Generator().manual_seed(7))
    caches = [c.clone() for c in runner.kv_caches]
    fused = model.fused_decode()
    assert fused is not None
    with torch.inference_mode():
        want_hidden, want_residual = _unfused_layers(model, positions, ids, caches, metadata)
        embeds = model.embed_tokens(ids)  # [num_seqs, hidden]
        assert fused.takes(embeds, runner.kv_caches, metadata)
        hidden, residual = fused.forward(positions, embeds, runner.kv_caches, metadata)
    assert hidden.dtype == want_hidden.dtype == dtype
    assert torch.equal(residual, want_residual)
    assert torch.equal(hidden, want_hidden)
    for got, want in zip(runner.kv_caches, caches):
        assert torch.equal(got, want)


LOWER_LEVELS = [level for level in isa.available() if level != isa.kernel_level(isa.selected())]


@pytest.mark.parametrize("level", LOWER_LEVELS)
def test_fused_layers_equal_unfused_layers_at_each_lower_isa_level(level):
    """The whole process at a lower level (kernels of both paths built for it), in a child."""
    env = {**os.environ, isa.ENV_VAR: level}
    select = "bitwise and (gqa_bias and (seq_lens3 or seq_lens4) or gguf)"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", select],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout


def test_fused_path_is_taken_for_decode_and_not_for_prefill_or_five_tokens(model_dir):
    runner = _runner(model_dir, DTYPES[0], 16)
    model = runner.model.model
    fused = model.fused_decode()
    assert fused is not None and fused.num_steps == 0
    ids = torch.arange(5)  # [5]
    with torch.inference_mode():
        prefill_positions, prefill = _decode_metadata([5], 16, seed=1)
        prefill = AttentionMetadata(  # one sequence of 5 prompt tokens
            slot_mapping=prefill.block_tables[0, 0] * 16 + torch.arange(5),
            query_start_loc=torch.tensor([0, 5]),
            seq_lens=torch.tensor([5]),
            block_tables=prefill.block_tables,
            logits_indices=torch.tensor([4]),
            max_query_len=5,
            max_seq_len=5,
        )
        runner.model(ids, torch.arange(5), runner.kv_caches, prefill)
        assert fused.num_steps == 0
        five_positions, five = _decode_metadata([3, 9, 20, 4, 40], 16, seed=2)
        runner.model(ids, five_positions, runner.kv_caches, five)
        assert fused.num_steps == 0
        one_positions, one = _decode_metadata([6], 16, seed=3)
        runner.model(ids[:1], one_positions, runner.kv_caches, one)
        assert fused.num_steps == 1


def test_switch_turns_the_fused_path_off(model_dir, monkeypatch):
    monkeypatch.setenv(cpu_decode.ENV_SWITCH, "0")
    assert _runner(model_dir, DTYPES[0], 16).model.model.fused_decode() is None


def test_bad_slot_is_a_value_error_naming_slot_mapping(model_dir):
    runner = _runner(model_dir, DTYPES[0], 16)
    model = runner.model.model
    positions, metadata = _decode_metadata([10, 20], 16, seed=4)
    bad = AttentionMetadata(**{**metadata.__dict__, "slot_mapping": torch.tensor([3, 10_000])})
    with (
        torch.inference_mode(),
        pytest.raises(ValueError, match=r"slot_mapping.*sequence 1 \(value 10000\)"),
    ):
        model.fused_decode().forward(
            positions, model.embed_tokens(positions), runner.kv_caches, bad
        )


def test_library_key_covers_every_included_file(tmp_path):
    (tmp_path / "main.c").write_text('#include "part.c"\nint main(void) { return f(); }\n')
    (tmp_path / "part.c").write_text("static int f(void) { return 0; }\n")
    before = native.source_with_includes(tmp_path / "main.c")
    (tmp_path / "part.c").write_text("static int f(void) { return 1; }\n")
    after = native.source_with_includes(tmp_path / "main.c")
    assert before != after and b"return 1" in after
    shipped = native.source_with_includes(decoder_layer.SOURCE)
    for name in ("simd_base.c", "matvec.c", "attention.c", "norm_rope.c"):
        assert (decoder_layer.SOURCE.parent / name).read_bytes() in shipped


def _greedy_tokens(path: Path, dtype: torch.dtype, block_size: int) -> tuple[list, int]:
    llm = LLM(
        model=str(path),
        dtype=str(dtype).removeprefix("torch."),
        skip_tokenizer_init=True,
        block_size=block_size,
        num_blocks_override=64,
        device="cpu",
        max_num_seqs=3,
    )
    prompts = [[5, 9, 13, 2 + i, 40 - i] * (1 + 3 * i) for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    fused = llm.engine.executor.runner.model.model.fused_decode()
    llm.close()  # unpins this thread's compute threads for the tests after it
    return [o.outputs[0].token_ids for o in outs], 0 if fused is None else fused.num_steps


@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_greedy_tokens_equal_with_fused_path_on_and_off(model_dir, dtype, monkeypatch):
    tokens_on, steps_on = _greedy_tokens(model_dir, dtype, 16)
    monkeypatch.setenv(cpu_decode.ENV_SWITCH, "off")
    tokens_off, steps_off = _greedy_tokens(model_dir, dtype, 16)
    assert steps_on > 20 and steps_off == 0
    assert tokens_on == tokens_off


def test_int32_metadata_runs_like_int64(model_dir):
    runner = _runner(model_dir, DTYPES[0], 32)
    model = runner.model.model
    positions, metadata = _decode_metadata([40, 3, 66], 32, seed=6)
    narrow = AttentionMetadata(
        **{
            **metadata.__dict__,
            **{k: getattr(metadata, k).int() for k in ("query_start_loc", "seq_lens")},
            "block_tables": metadata.block_tables.int(),
        }
    )
    caches = [c.clone() for c in runner.kv_caches]
    with torch.inference_mode():
        embeds = model.embed_tokens(positions)  # [3, hidden]
        want = [
            t.clone() for t in model.fused_decode().forward(positions, embeds, caches, metadata)
        ]
        got = model.fused_decode().forward(positions.int(), embeds, runner.kv_caches, narrow)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
