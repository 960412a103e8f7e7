"""Triton MLA decode (absorbed form) against the paphos.ops reference: contexts straddling pages,
one and many splits, head counts that do not fill a head block, DeepSeek-V3's row (512 + 64) and
small ones; the reference runs in float32 on upcast inputs. Also through `LatentAttention`: a
pure-decode step picks the kernel and equals the expanded form."""

from __future__ import annotations

import pytest
import torch

from paphos.ops.mla_attention import mla_decode_attention as reference
from tests.gpu.conftest import interpreting, rel_error, skip_interpreted_bf16_dot

pytestmark = pytest.mark.gpu
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}


def make_batch(seq_lens, num_heads, latent, rope, page_size, dtype, device, spare_blocks=2):
    gen = torch.Generator().manual_seed(0)
    pages = [-(-s // page_size) for s in seq_lens]
    num_blocks = sum(pages) + 3
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seq_lens), max(pages) + spare_blocks, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        tables[b, :n] = order[used : used + n]
        used += n
    cache = torch.randn(num_blocks, page_size, latent + rope, generator=gen)
    query = torch.randn(len(seq_lens), num_heads, latent + rope, generator=gen) * 0.3
    return dict(
        query=query.to(dtype).to(device),
        kv_cache=cache.to(dtype).to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        scale=(latent + rope) ** -0.5,
        latent_dim=latent,
    )


CASES = [
    # (seq_lens, heads, latent, rope, page_size)
    ([1, 17, 40, 16], 4, 32, 8, 16),  # tiny DeepSeek test shape: heads < head block, rope < 16
    ([300, 5, 129], 20, 64, 16, 16),  # two head blocks (the second part-filled), splits
    ([1000], 16, 32, 16, 64),  # one long sequence: many splits
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_mla_decode_kernel_matches_reference(device, dtype, case):
    skip_interpreted_bf16_dot(device, dtype)
    from paphos.kernels.mla_decode import mla_decode_attention

    batch = make_batch(*case, dtype=dtype, device=device)
    out = mla_decode_attention(**batch)
    upcast = dict(batch, query=batch["query"].float(), kv_cache=batch["kv_cache"].float())
    want = reference(**{k: v.cpu() if torch.is_tensor(v) else v for k, v in upcast.items()})
    assert out.shape == want.shape and out.dtype == dtype
    assert rel_error(out.float().cpu(), want) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mla_decode_kernel_deepseek_v3_row(device, dtype):
    """128 heads (8 head blocks) over 512 + 64 values per row, pages of 64."""
    if interpreting():
        pytest.skip("128 heads x 576 values: too slow in the interpreter")
    from paphos.kernels.mla_decode import mla_decode_attention

    batch = make_batch([1, 77, 700, 2048], 128, 512, 64, 64, dtype=dtype, device=device)
    out = mla_decode_attention(**batch)
    upcast = dict(batch, query=batch["query"].float(), kv_cache=batch["kv_cache"].float())
    assert rel_error(out.float(), reference(**upcast)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_latent_cache_kernel_matches_reference(device, dtype):
    from paphos.kernels.mla_decode import write_latent_cache
    from paphos.ops.mla_attention import write_latent_cache as write_reference

    gen = torch.Generator().manual_seed(2)
    latent = torch.randn(5, 48, generator=gen).to(dtype)  # the model's dtype, as in a run
    k_pe = torch.randn(5, 16, generator=gen).to(dtype)
    slots = torch.tensor([3, 40, -1, 0, 63])  # -1: a padded graph row, skipped
    want = torch.zeros(4, 16, 64, dtype=dtype)
    write_reference(latent, k_pe, want, slots)
    got = torch.zeros(4, 16, 64, dtype=dtype, device=device)
    write_latent_cache(latent.to(device), k_pe.to(device), got, slots.to(device))
    assert torch.equal(got.cpu(), want)


def test_latent_attention_decode_on_the_device_equals_expanded_form(device):
    from paphos.attention import AttentionMetadata, LatentAttention
    from paphos.kernels.mla_decode import mla_decode_attention, write_latent_cache
    from paphos.ops.mla_attention import mla_expanded_attention

    heads, latent, nope, rope, v_dim = 4, 32, 16, 16, 12
    with torch.device(device):
        layer = LatentAttention(heads, latent, nope, rope, v_dim, scale=0.2)
    if device.type == "cuda":
        assert layer._decode is mla_decode_attention  # the Triton kernels were picked at start-up
        assert layer._write_cache is write_latent_cache
    else:  # the interpreter: the CPU picks the reference, so hand the layer the kernel
        layer._decode, layer._write_cache = mla_decode_attention, write_latent_cache
    batch = make_batch([9, 33], heads, latent, rope, 16, torch.float32, device)
    gen = torch.Generator().manual_seed(1)
    w_kv_b = (torch.randn(heads, nope + v_dim, latent, generator=gen) * 0.3).to(device)
    q_nope = torch.randn(2, heads, nope, generator=gen).to(device)
    q_pe, k_pe = batch["query"][..., latent:], torch.randn(2, rope, generator=gen).to(device)
    latent_in = torch.randn(2, latent, generator=gen).to(device)
    tables, seq_lens = batch["block_tables"], batch["seq_lens"]
    last = (seq_lens - 1).long()
    slots = tables[torch.arange(2, device=device), last // 16].long() * 16 + last % 16
    meta = AttentionMetadata(
        slots, torch.tensor([0, 1, 2], device=device), seq_lens, tables,
        torch.arange(2, device=device), 1, 33,
    )  # fmt: skip
    cache = batch["kv_cache"]
    out = layer(q_nope, q_pe, latent_in, k_pe, w_kv_b, cache, meta).view(2, heads, v_dim)
    for b, seq_len in enumerate([9, 33]):
        want = mla_expanded_attention(
            q_nope[b : b + 1], q_pe[b : b + 1], cache, seq_len, tables[b], w_kv_b, 0.2
        )
        assert rel_error(out[b : b + 1], want) <= 1e-4
