"""FP8 KV caches in the Triton kernels (`--kv-cache-dtype fp8|fp8_e4m3|fp8_e5m2` on CUDA): the
KV write (plain and fused with rotary) saturates and casts as paphos.ops.kv_cache does, byte for
byte; prefill and decode attention over an fp8 cache equal the float32 reference over the same
cache upcast, i.e. over K/V rounded to fp8 (head sizes 64/128, with and without a sliding
window, decode splits, per-tensor scales other than 1).

Under the interpreter (Triton 3.9, CPU) fp8 loads are exact but its float -> fp8 cast rounds
some values near a power of two down by a whole binade (seen: 1.947 -> 1.0 in e4m3), so there
the write tests take values fp8 holds exactly (the cast is then exact) and the fused rotary
write, whose rotated keys are arbitrary, runs on CUDA only."""

from __future__ import annotations

import pytest
import torch

from paphos.ops import kv_cache as kv_ops
from paphos.ops.paged_attention import paged_attention as ref_paged_attention
from paphos.ops.rotary import rotary_and_write_kv as ref_rotary_and_write_kv
from tests.gpu.conftest import interpreting, rel_error, skip_interpreted_bf16_dot
from tests.gpu.test_paged_attention_kernel import ATTN_TOLERANCE, MIXED_BATCH, make_batch
from tests.gpu.test_rotary_and_kv_cache_kernels import llama3_cos_sin_cache

pytestmark = pytest.mark.gpu
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def _kv(shape, dtype, cache_dtype, scale, device, gen):
    """Random K/V (x 3, a few past the fp8 range: saturated); under the interpreter values that
    fp8 holds exactly once divided by the scale (a power of two)."""
    t = torch.randn(shape, generator=gen) * 3  # [num_tokens, num_kv_heads, head_size]
    if interpreting():
        t = (t / scale).clamp(-400, 400).to(cache_dtype).float() * scale
    t.view(-1)[:3] = torch.tensor([6e4, -6e4, 1e-9])  # saturated both ways; a subnormal / 0
    return t.to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", list(FP8))
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.5, 4.0)])
def test_fp8_write_matches_reference_bytes(device, dtype, kind, scales):
    from paphos.kernels.kv_cache import write_kv_cache

    gen = torch.Generator().manual_seed(1)
    num_blocks, block_size, num_kv_heads, head_size, num_tokens = 5, 16, 2, 128, 37
    cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_size, dtype=FP8[kind])
    cache, ref_cache = cache.to(device), cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]  # [num_tokens]
    slots[5] = -1  # padding: nothing written
    key = _kv((num_tokens, num_kv_heads, head_size), dtype, FP8[kind], scales[0], device, gen)
    value = _kv((num_tokens, num_kv_heads, head_size), dtype, FP8[kind], scales[1], device, gen)
    write_kv_cache(key, value, cache, slots.to(device), *scales)
    keep = slots >= 0
    kv_ops.write_kv_cache(key.cpu()[keep], value.cpu()[keep], ref_cache, slots[keep], *scales)
    assert torch.equal(cache.cpu().view(torch.uint8), ref_cache.view(torch.uint8))
    assert cache.float().abs().max() == torch.finfo(FP8[kind]).max  # saturated, not NaN / inf


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", list(FP8))
@pytest.mark.parametrize("head_size,rot_dim", [(64, 64), (128, 64)])
def test_fp8_fused_rotary_write_matches_rotary_then_write(device, dtype, kind, head_size, rot_dim):
    """The fused kernel rounds the rotated keys to the model's dtype before fp8, as the
    unfused path does; float32 rotation may still differ in the last bit (FMA), so a rare byte
    may differ by one step."""
    from paphos.kernels.rotary import rotary_and_write_kv

    if interpreting():
        pytest.skip("the interpreter's float -> fp8 cast is wrong near powers of two")
    gen = torch.Generator().manual_seed(2)
    num_tokens, num_heads, num_kv_heads, block_size, num_blocks = 13, 8, 2, 16, 4
    cos_sin = llama3_cos_sin_cache(rot_dim, 4096, 500000.0).to(device)  # [pos, rot_dim]
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(device)
    query = (torch.randn(num_tokens, num_heads * head_size, generator=gen) * 3).to(dtype).to(device)
    key = (torch.randn(num_tokens, num_kv_heads * head_size, generator=gen) * 3).to(dtype)
    value = (torch.randn(num_tokens, num_kv_heads * head_size, generator=gen) * 3).to(dtype)
    key, value = key.to(device), value.to(device)
    shape = (2, num_blocks, block_size, num_kv_heads, head_size)
    cache = torch.zeros(shape, dtype=FP8[kind], device=device)
    ref_cache = cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(device)
    args = (cos_sin, head_size, True)
    q = rotary_and_write_kv(positions, query, key, value, *args, cache, slots, 0.5, 2.0)
    q_ref = ref_rotary_and_write_kv(positions, query, key, value, *args, ref_cache, slots, 0.5, 2.0)
    assert rel_error(q, q_ref) < 1e-2
    same = cache.view(torch.uint8) == ref_cache.view(torch.uint8)
    assert same.float().mean() > 0.99
    assert rel_error(cache.float(), ref_cache.float()) < 2e-2


def _fp8_batch(batch: dict, cache_dtype: torch.dtype, scales: tuple[float, float]) -> dict:
    """The batch with its cache stored as fp8 (K / k_scale, V / v_scale, by the reference)."""
    kv = batch["kv_cache"]
    fp8 = torch.stack([kv_ops.to_fp8(kv[i], cache_dtype, scales[i]) for i in (0, 1)])
    return dict(batch, kv_cache=fp8)


def _reference(batch: dict, scales: tuple[float, float], **limits) -> torch.Tensor:
    """float32 attention over the fp8 cache upcast (K/V rounded to fp8, times the scales)."""
    upcast = batch["kv_cache"].float() * torch.tensor(scales, device=batch["query"].device).view(
        2, 1, 1, 1, 1
    )
    return ref_paged_attention(
        **dict(batch, query=batch["query"].float(), kv_cache=upcast), **limits
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", list(FP8))
@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize("sliding_window", [None, 24])
def test_attention_over_fp8_cache_matches_reference(device, dtype, kind, head_size, sliding_window):
    """Mixed batch: decodes and prefill chunks with cached context; GQA 4."""
    from paphos.kernels.paged_attention import paged_attention

    skip_interpreted_bf16_dot(device, dtype)
    torch.manual_seed(3)
    batch = _fp8_batch(
        make_batch(MIXED_BATCH, 8, 2, head_size, 16, dtype, device), FP8[kind], (1, 1)
    )
    limits = {} if sliding_window is None else {"sliding_window": sliding_window}
    out = paged_attention(**batch, max_query_len=40, **limits)
    want = _reference(batch, (1.0, 1.0), **limits)
    assert rel_error(out, want) < ATTN_TOLERANCE[dtype]
    # the reference over the same cache (its own upcast path) agrees
    float_query = dict(batch, query=batch["query"].float())
    assert rel_error(ref_paged_attention(**float_query, **limits), want) < 1e-6


@pytest.mark.parametrize("kind", list(FP8))
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_decode_splits_and_scales_match_reference(device, kind, num_splits):
    """k_scale folds into the score scale, v_scale multiplies the output (before the merge of
    splits); a soft-cap sees the scaled scores."""
    from paphos.kernels.decode_attention import decode_attention

    torch.manual_seed(4)
    scales = (0.5, 4.0)
    lens = [(1, 300), (1, 17), (1, 129)]
    batch = _fp8_batch(make_batch(lens, 8, 2, 64, 16, torch.float16, device), FP8[kind], scales)
    for limits in ({}, {"soft_cap": 5.0}):
        out = torch.zeros_like(batch["query"])
        decode_attention(
            batch["query"], batch["kv_cache"], batch["query_start_loc"], batch["seq_lens"],
            batch["block_tables"], batch["scale"], out, num_splits, k_scale=scales[0],
            v_scale=scales[1], **limits,
        )  # fmt: skip
        want = _reference(batch, scales, **limits)
        assert rel_error(out, want) < ATTN_TOLERANCE[torch.float16]
        float_query = dict(batch, query=batch["query"].float())
        got_ref = ref_paged_attention(**float_query, k_scale=scales[0], v_scale=scales[1], **limits)
        assert rel_error(got_ref, want) < 1e-6


def test_fp8_prefill_scales_match_reference(device):
    from paphos.kernels.paged_attention import paged_attention

    torch.manual_seed(5)
    scales = (2.0, 0.25)
    batch = make_batch([(7, 7), (17, 64), (1, 40)], 8, 2, 128, 16, torch.float16, device)
    batch = _fp8_batch(batch, FP8["e4m3"], scales)
    out = paged_attention(**batch, max_query_len=17, k_scale=scales[0], v_scale=scales[1])
    assert rel_error(out, _reference(batch, scales)) < ATTN_TOLERANCE[torch.float16]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the engine on CUDA: needs a device")
@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_engine_with_fp8_cache_on_cuda_stays_close(tiny_llama_dir, kv_cache_dtype):
    """The tiny Llama in bf16 on CUDA (decode CUDA graphs on) with an fp8 cache against the same
    model with a bf16 cache: prompt logprobs within 3e-2 (CPU: 1.1e-2 at most), first greedy tokens
    equal (64 blocks each)."""
    import numpy as np

    from paphos import LLM, SamplingParams

    prompt = list(range(5, 29))
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=8, prompt_logprobs=1)
    runs = {}
    for name in ("auto", kv_cache_dtype):
        kwargs = dict(dtype="bfloat16", skip_tokenizer_init=True, device="cuda")
        with LLM(
            model=str(tiny_llama_dir), kv_cache_dtype=name, num_blocks_override=64, **kwargs
        ) as llm:
            out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
            assert llm.engine.num_kv_blocks == 64
        logprobs = [e[prompt[i]].logprob for i, e in enumerate(out.prompt_logprobs) if e]
        runs[name] = (out.outputs[0].token_ids, np.array(logprobs))
    # the same runs on CPU (reference attention): 0.0068 (e4m3) and 0.011 (e5m2) at most
    np.testing.assert_allclose(runs[kv_cache_dtype][1], runs["auto"][1], atol=3e-2, rtol=0)
    assert runs[kv_cache_dtype][0][:4] == runs["auto"][0][:4]
