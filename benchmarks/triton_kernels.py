"""Check and time every Triton kernel in paphos.kernels against its torch reference on one CUDA GPU.

Floors first (device copy bandwidth, bf16 matmul rate), then per kernel: relative error vs the
reference, median time of kernel and reference (CUDA events via triton.testing.do_bench, L2
flushed), and the kernel's bandwidth/compute floor. Prints a table; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable

import torch
import triton

from paphos.kernels import CUDA_KERNELS, ssd_update
from paphos.kernels import gated_delta_rule as gdn_kernel
from paphos.kernels._checks import num_sms
from paphos.kernels.decode_attention import (
    DecodeTiles,
    decode_attention,
    default_decode_tiles,
    num_decode_splits,
)
from paphos.kernels.prefill_attention import PrefillTiles, default_prefill_tiles, prefill_attention
from paphos.ops.paged_attention import paged_attention as ref_paged_attention
from paphos.ops.registry import REFERENCES

DTYPE = torch.bfloat16


def median_ms(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def measure_floors(device: torch.device) -> dict[str, float]:
    src = torch.randn(256 * 1024 * 1024, device=device)  # [256M] float32 = 1 GiB
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device=device, dtype=DTYPE)  # [8192, 8192]
    b = torch.randn(8192, 8192, device=device, dtype=DTYPE)  # [8192, 8192]
    mm_ms = median_ms(lambda: a @ b)
    return {
        "copy_gbps": 2 * src.numel() * 4 / copy_ms / 1e6,
        "bf16_tflops": 2 * 8192**3 / mm_ms / 1e9,
    }


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def elementwise_cases(device: torch.device) -> list[tuple[str, tuple, float, float]]:
    """(op, args, bytes moved, flops) for the row-wise ops at Llama-8B widths."""
    n, hidden, inter = 16384, 4096, 14336
    x = torch.randn(n, hidden, device=device, dtype=DTYPE)  # [n, hidden]
    r = torch.randn(n, hidden, device=device, dtype=DTYPE)  # [n, hidden]
    w = torch.randn(hidden, device=device, dtype=DTYPE)  # [hidden]
    gate_up = torch.randn(n, 2 * inter, device=device, dtype=DTYPE)  # [n, 2 * inter]
    positions = torch.randint(0, 8192, (n,), device=device)  # [n]
    cos_sin = torch.randn(8192, 128, device=device)  # [8192, 128] float32
    q = torch.randn(n, 32 * 128, device=device, dtype=DTYPE)  # [n, 32 heads * 128]
    k = torch.randn(n, 8 * 128, device=device, dtype=DTYPE)  # [n, 8 kv heads * 128]
    num_blocks, block = n // 16 + 8, 16
    cache = torch.randn(2, num_blocks, block, 8, 128, device=device, dtype=DTYPE)
    slots = torch.randperm(num_blocks * block, device=device)[:n]  # [n]
    kv = k.view(n, 8, 128)  # [n, 8, 128]
    e = n * hidden * 2
    return [
        ("rms_norm", (x, w, 1e-6), 2 * e, 4 * n * hidden),
        ("fused_add_rms_norm", (x, r, w, 1e-6), 4 * e, 5 * n * hidden),
        ("silu_and_mul", (gate_up,), 3 * n * inter * 2, 6 * n * inter),
        (
            "rotary_embedding",
            (positions, q, k, cos_sin, 128, True),
            2 * n * 40 * 128 * 2 + n * 128 * 4,
            6 * n * 40 * 64,
        ),
        ("write_kv_cache", (kv, kv, cache, slots), 4 * n * 8 * 128 * 2, 0),
    ]


def paged_batch(
    lens: list[tuple[int, int]],
    device: torch.device,
    heads: int = 32,
    kv_heads: int = 8,
    head_size: int = 128,
    block: int = 16,
) -> dict:
    """A paged batch of sequences given as (q_len, seq_len), each on shuffled blocks."""
    per_seq = [-(-s // block) for _, s in lens]
    ids = torch.randperm(sum(per_seq), device=device, dtype=torch.int32)
    tables = torch.zeros(len(lens), max(per_seq), dtype=torch.int32, device=device)
    used = 0
    for b, n in enumerate(per_seq):
        tables[b, :n] = ids[used : used + n]
        used += n
    q_lens = torch.tensor([q for q, _ in lens])
    starts = torch.zeros(len(lens) + 1, dtype=torch.int32)  # [num_seqs + 1]
    starts[1:] = q_lens.cumsum(0)
    return dict(
        # [num_tokens, heads, head_size]
        query=torch.randn(int(q_lens.sum()), heads, head_size, device=device, dtype=DTYPE),
        # [2, num_blocks, block, kv_heads, head_size]
        kv_cache=torch.randn(
            2, sum(per_seq), block, kv_heads, head_size, device=device, dtype=DTYPE
        ),
        query_start_loc=starts.to(device),
        seq_lens=torch.tensor([s for _, s in lens], device=device, dtype=torch.int32),
        block_tables=tables,
        scale=head_size**-0.5,
    )


def attention_cost(
    lens: list[tuple[int, int]], heads: int = 32, kv_heads: int = 8, head_size: int = 128
) -> tuple[float, float]:
    """(bytes, flops): each sequence's K and V read once; causal QK^T and PV counted."""
    kv_bytes = sum(s for _, s in lens) * kv_heads * head_size * 2 * 2
    q_bytes = 2 * sum(q for q, _ in lens) * heads * head_size * 2
    pairs = sum(q * (s - q) + q * (q + 1) / 2 for q, s in lens)
    return kv_bytes + q_bytes, 4 * pairs * heads * head_size


ATTENTION_CASES = {
    "decode b64 L2048": [(1, 2048)] * 64,
    "decode b4 L32768": [(1, 32768)] * 4,
    "decode b256 L512": [(1, 512)] * 256,
    "prefill 4x2048": [(2048, 2048)] * 4,
    "chunk 4x512 ctx4096": [(512, 4608)] * 4,
    "mixed 32dec+2chunk": [(1, 2048)] * 32 + [(512, 2048)] * 2,
}


def run_case(
    name: str,
    op: str,
    args: tuple,
    kwargs: dict,
    cost: tuple[float, float],
    floors: dict[str, float],
) -> dict:
    kernel, reference = CUDA_KERNELS[op], REFERENCES[op]
    if op == "write_kv_cache":  # in place: each writes its own copy of the cache
        key, value, cache, slots = args
        ref_cache = cache.clone()
        kernel(*args)
        reference(key, value, ref_cache, slots)
        out, ref = cache, ref_cache
    else:
        out, ref = kernel(*args, **kwargs), reference(*args)
    err = max(rel_error(o, r) for o, r in zip(_as_tuple(out), _as_tuple(ref), strict=True))
    kernel_ms = median_ms(lambda: kernel(*args, **kwargs))
    ref_ms = median_ms(lambda: reference(*args))
    floor_ms = max(cost[0] / floors["copy_gbps"] / 1e6, cost[1] / floors["bf16_tflops"] / 1e9)
    return dict(
        case=name,
        op=op,
        rel_err=err,
        kernel_ms=kernel_ms,
        ref_ms=ref_ms,
        floor_ms=floor_ms,
        bytes=cost[0],
        flops=cost[1],
    )


def _guarded(
    name: str,
    op: str,
    args: tuple,
    kwargs: dict,
    cost: tuple[float, float],
    floors: dict[str, float],
) -> list[dict]:
    """One case's row, or none (with the error printed) so that one failure keeps the table."""
    try:
        return [run_case(name, op, args, kwargs, cost, floors)]
    except Exception as e:  # noqa: BLE001 - a benchmark reports every case it can
        print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
        return []


def _as_tuple(x: object) -> tuple:
    return x if isinstance(x, tuple) else (x,)


# MLA decode at DeepSeek-V3's row (512 latent + 64 rope): 128 heads (TP=1) and 16 (TP=8)
MLA_CASES = {
    "mla h128 b1 L4096": (128, [4096]),
    "mla h128 b64 L2048": (128, [2048] * 64),
    "mla h16 b256 L1024": (16, [1024] * 256),
}
MLA_LATENT, MLA_ROPE = 512, 64


def mla_case(heads: int, seq_lens: list[int], device: torch.device) -> tuple[tuple, float, float]:
    """(args, bytes, flops): every sequence's latent rows read once (keys and values at once);
    scores over 576 values and outputs over 512 per head and row."""
    row = MLA_LATENT + MLA_ROPE
    batch = paged_batch([(1, s) for s in seq_lens], device, heads, 1, row)
    cache = batch["kv_cache"][0, :, :, 0]  # [num_blocks, block, row]
    args = (batch["query"], cache, batch["seq_lens"], batch["block_tables"], row**-0.5, MLA_LATENT)
    num_bytes = sum(seq_lens) * row * 2 + len(seq_lens) * heads * (row + MLA_LATENT) * 2
    return args, num_bytes, 2 * sum(seq_lens) * heads * (row + MLA_LATENT)


PREFILL_CASES = ("prefill 4x2048", "chunk 4x512 ctx4096")
DECODE_CASES = ("decode b64 L2048", "decode b4 L32768", "decode b256 L512")


def prefill_variants() -> list[PrefillTiles]:
    grid = itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))
    return [PrefillTiles(rows=r, block_n=n, num_warps=w, num_stages=s) for r, n, w, s in grid]


def decode_variants() -> list[tuple[DecodeTiles, int | None]]:
    grid = itertools.product((32, 64, 128), (4, 8), (2, 3, 4))
    tiles = [DecodeTiles(block_n=n, num_warps=w, num_stages=s) for n, w, s in grid]
    return [(t, None) for t in tiles] + [(default_decode_tiles(128), s) for s in (1, 2, 4, 8, 16)]


def time_prefill(batch: dict, lens: list, tiles: PrefillTiles, ref: torch.Tensor) -> dict:
    out = torch.full_like(batch["query"], float("nan"))  # [tokens, heads, head_size], poisoned
    max_q = max(q for q, _ in lens)

    def launch() -> None:
        prefill_attention(**batch, out=out, max_query_len=max_q, tiles=tiles)

    launch()
    return dict(config=repr(tiles), rel_err=rel_error(out, ref), ms=median_ms(launch))


def time_decode(
    batch: dict, lens: list, tiles: DecodeTiles, splits: int | None, ref: torch.Tensor
) -> dict:
    out = torch.full_like(batch["query"], float("nan"))  # [num_seqs, heads, head_size], poisoned
    if splits is None:
        splits = num_decode_splits(
            len(lens), batch["kv_cache"].shape[3], max(s for _, s in lens), num_sms(out.device)
        )

    def launch() -> None:
        decode_attention(**batch, out=out, num_splits=splits, tiles=tiles)

    launch()
    return dict(
        config=f"{tiles!r} splits={splits}", rel_err=rel_error(out, ref), ms=median_ms(launch)
    )


def sweep(name: str, variants: list, timer) -> list[dict]:
    lens = ATTENTION_CASES[name]
    batch = paged_batch(lens, torch.device("cuda"))
    ref = ref_paged_attention(**batch)
    rows = []
    for variant in variants:
        try:
            rows.append(dict(case=name, **timer(batch, lens, *variant, ref)))
        except Exception as e:  # noqa: BLE001 - a config may not fit; report and go on
            rows.append(dict(case=name, config=repr(variant), error=f"{type(e).__name__}"))
    return rows


def run_sweep() -> list[dict]:
    """Tile-shape sweep of the attention kernels; the default is timed first and last (noise)."""
    rows = []
    default_p = default_prefill_tiles(128)
    for name in PREFILL_CASES:
        variants = [(default_p,)] + [(t,) for t in prefill_variants()] + [(default_p,)]
        rows += sweep(name, variants, time_prefill)
    default_d = (default_decode_tiles(128), None)
    for name in DECODE_CASES:
        rows += sweep(name, [default_d] + decode_variants() + [default_d], time_decode)
    for name in PREFILL_CASES + DECODE_CASES:
        ok = [r for r in rows if r["case"] == name and "ms" in r and r["rel_err"] < 2e-2]
        print(f"== {name}: {len(ok)} ok of {sum(r['case'] == name for r in rows)}")
        first = [r for r in rows if r["case"] == name and "ms" in r][:1]
        for r in first + sorted(ok, key=lambda r: r["ms"])[:5]:
            print(f"  {r['ms']:.4f} ms  err {r['rel_err']:.1e}  {r['config']}")
    return rows


# Hybrid prompt chunks: one fresh 8192-token prompt through one layer's state ops (bf16 inputs,
# float32 states). Qwen3.5-27B Gated DeltaNet: 16 key / 48 value heads of 128, its conv over
# q | k | v (10240 channels); Mamba2-2.7B: 80 heads of 64, 1 group, state 128 (conv: 5376).
HYBRID_PREFILL_TOKENS = 8192
HYBRID_OPS = ("causal_conv1d", "ssd", "gated_delta_rule")


def hybrid_prefill_cases(device: torch.device) -> list[tuple[str, str, tuple, float, float]]:
    """(case, op, args, bytes, flops); flops of the chunked forms at the kernels' chunk lengths
    (the kernels multiply in float32 on the CUDA cores, so the bf16 matmul floor is far)."""
    t = HYBRID_PREFILL_TOKENS
    batch = (
        torch.tensor([0, t], device=device),  # query_start_loc (int64, as the runner's)
        torch.tensor([0], device=device),  # state_indices
        torch.tensor([False], device=device),  # has_initial: fresh (its slot is not read)
        t,
    )

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=DTYPE)

    cases = []
    for name, dim in (("conv1d qwen3.5-27b 8k", 10240), ("conv1d mamba2-2.7b 8k", 5376)):
        args = (randn(t, dim), randn(dim, 4), None, randn(2, dim, 3), *batch, "silu")
        cases.append((name, "causal_conv1d", args, 2 * t * dim * 2, 2 * t * dim * 4))
    heads, p, groups, n, chunk = 80, 64, 1, 128, ssd_update.PREFILL_CHUNK
    ones, zeros = torch.ones(heads, device=device), torch.zeros(heads, device=device)
    states = torch.zeros(2, heads, p, n, device=device)  # [slots, H, P, N] float32
    args = (randn(t, heads, p), randn(t, heads), -torch.rand(heads, device=device))
    args += (randn(t, groups, n), randn(t, groups, n), ones, zeros, states, *batch, 256)
    num_bytes = 2 * (2 * t * heads * p + 2 * t * groups * n + t * heads)
    flops = 2 * t * heads * (chunk * n + chunk * p + 2 * n * p)
    cases.append(("ssd mamba2-2.7b 8k", "ssd", args, num_bytes, flops))
    hk, hv, d, chunk = 16, 48, 128, gdn_kernel.PREFILL_CHUNK
    g = -torch.rand(t, hv, device=device)  # [T, Hv] log decay
    beta = torch.rand(t, hv, device=device)  # [T, Hv]
    states = torch.zeros(2, hv, d, d, device=device)  # [slots, Hv, Dk, Dv] float32
    args = (randn(t, hk, d), randn(t, hk, d), randn(t, hv, d), g, beta, states, *batch, 64)
    num_bytes = 2 * (2 * t * hk * d + 2 * t * hv * d) + 2 * t * hv * 4
    flops = 2 * t * hv * (5 * chunk * d + 3 * d * d)
    cases.append(("gdn qwen3.5-27b 8k", "gated_delta_rule", args, num_bytes, flops))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="write results as JSON to this file")
    parser.add_argument("--sweep", action="store_true", help="also sweep attention tile shapes")
    cli = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    floors = measure_floors(device)
    print(
        f"{torch.cuda.get_device_name(device)}: copy {floors['copy_gbps']:.0f} GB/s, "
        f"bf16 matmul {floors['bf16_tflops']:.0f} TFLOP/s",
        flush=True,
    )
    rows = []
    for op, args, num_bytes, flops in elementwise_cases(device):
        rows.extend(_guarded(op, op, args, {}, (num_bytes, flops), floors))
    for name, lens in ATTENTION_CASES.items():
        batch = paged_batch(lens, device)
        hints = dict(max_query_len=max(q for q, _ in lens), max_seq_len=max(s for _, s in lens))
        rows.extend(
            _guarded(
                name, "paged_attention", tuple(batch.values()), hints, attention_cost(lens), floors
            )
        )
    for name, (heads, seq_lens) in MLA_CASES.items():
        args, num_bytes, flops = mla_case(heads, seq_lens, device)
        rows.extend(_guarded(name, "mla_decode_attention", args, {}, (num_bytes, flops), floors))
    for name, op, args, num_bytes, flops in hybrid_prefill_cases(device):
        rows.extend(_guarded(name, op, args, {}, (num_bytes, flops), floors))
    print(
        f"{'case':<22}{'rel_err':>9}{'kernel ms':>11}{'ref ms':>10}{'floor ms':>10}"
        f"{'floor/kern':>11}{'speedup':>9}"
    )
    for r in rows:
        print(
            f"{r['case']:<22}{r['rel_err']:>9.1e}{r['kernel_ms']:>11.4f}{r['ref_ms']:>10.4f}"
            f"{r['floor_ms']:>10.4f}{r['floor_ms'] / r['kernel_ms']:>11.2f}"
            f"{r['ref_ms'] / r['kernel_ms']:>9.1f}"
        )
    for r in rows:
        if r["op"] in HYBRID_OPS:
            tokens = HYBRID_PREFILL_TOKENS * 1e3
            print(
                f"{r['case']}: prefill {tokens / r['kernel_ms']:.0f} tok/s "
                f"(torch reference {tokens / r['ref_ms']:.0f} tok/s)"
            )
    sweep_rows = run_sweep() if cli.sweep else []
    if cli.out:
        with open(cli.out, "w") as f:
            json.dump(
                dict(
                    device=torch.cuda.get_device_name(device),
                    floors=floors,
                    rows=rows,
                    sweep=sweep_rows,
                ),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
