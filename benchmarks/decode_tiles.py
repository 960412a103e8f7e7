"""Paged decode attention tiles at Llama-3 decode shapes, timed as a decode graph runs them: one
launch per layer over that layer's own KV cache (more bytes than L2 holds), captured in a CUDA
graph and replayed (eager timing would measure Triton's host launch cost for kernels this short).
One table per case: the default tiles first, then the five fastest variants, with the bandwidth
of the K/V bytes read and the error vs the torch reference.

    python benchmarks/decode_tiles.py [--cases "1b b64,8b b64"]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_kernels import paged_batch, rel_error  # noqa: E402

from paphos.kernels._checks import num_sms  # noqa: E402
from paphos.kernels.decode_attention import (  # noqa: E402
    DecodeTiles,
    decode_attention,
    default_decode_tiles,
    num_decode_splits,
)
from paphos.kernels.skinny_gemm import graph_time_us  # noqa: E402
from paphos.ops.paged_attention import paged_attention as ref_paged_attention  # noqa: E402

# (name, num_seqs, context, heads, kv_heads, head_size, layers)
CASES = (
    ("1b b64 ctx192", 64, 192, 32, 8, 64, 16),
    ("1b b256 ctx192", 256, 192, 32, 8, 64, 16),
    ("1b b64 ctx2048", 64, 2048, 32, 8, 64, 16),
    ("1b b128 ctx2048", 128, 2048, 32, 8, 64, 16),
    ("1b b256 ctx2048", 256, 2048, 32, 8, 64, 16),
    ("1b b1 ctx2048", 1, 2048, 32, 8, 64, 16),
    ("1b b1 ctx192", 1, 192, 32, 8, 64, 16),
    ("8b b64 ctx192", 64, 192, 32, 8, 128, 32),
    ("8b b64 ctx2048", 64, 2048, 32, 8, 128, 32),
    ("8b b1 ctx2048", 1, 2048, 32, 8, 128, 32),
)
# Stages above 4 matter: Triton's pipeliner keeps one K/V tile in flight behind the block-table
# load up to num_stages=4, two from 5 on (notes/cuda.md, session 6).
VARIANTS = [
    DecodeTiles(block_n=n, num_warps=w, num_stages=s)
    for n, w, s in itertools.product((32, 64, 128, 256), (4, 8), (3, 5, 7))
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", default="", help="comma-separated name prefixes (default: all)")
    prefixes = [p for p in parser.parse_args().cases.split(",") if p]
    print(torch.cuda.get_device_name())
    for name, seqs, ctx, heads, kv_heads, head, layers in CASES:
        if prefixes and not any(name.startswith(p) for p in prefixes):
            continue
        batch = paged_batch([(1, ctx)] * seqs, torch.device("cuda"), heads, kv_heads, head)
        caches = [batch["kv_cache"]] + [batch["kv_cache"].clone() for _ in range(layers - 1)]
        ref = ref_paged_attention(**batch)
        kv_bytes = seqs * ctx * kv_heads * head * 2 * 2
        sms = num_sms(ref.device)
        default_splits = num_decode_splits(seqs, kv_heads, 8192, sms)
        default_tiles = default_decode_tiles(head, seqs * kv_heads, default_splits, sms)
        rows = []
        for tiles, splits in [(default_tiles, default_splits)] + [
            (t, s) for t in VARIANTS for s in sorted({1, 2, 4, default_splits})
        ]:
            out = torch.full_like(batch["query"], float("nan"))  # poisoned
            args = {k: v for k, v in batch.items() if k != "kv_cache"}

            def launch(cache, t=tiles, s=splits, o=out, a=args):  # noqa: ANN001, ANN202
                decode_attention(**a, kv_cache=cache, out=o, num_splits=s, tiles=t)

            try:
                us = graph_time_us(launch, caches)
            except Exception as e:  # noqa: BLE001 - a tile may not fit: report and go on
                print(f"  {tiles} splits {splits}: {type(e).__name__}")
                continue
            launch(caches[0])
            rows.append((us, rel_error(out, ref), f"{tiles} splits={splits}"))
        print(f"== {name} (K/V {kv_bytes / 1e6:.1f} MB per layer)")
        for us, err, config in rows[:1] + sorted(rows[1:])[:5]:
            print(f"  {us:7.2f} us  {kv_bytes / us / 1e6:5.2f} TB/s  err {err:.1e}  {config}")


if __name__ == "__main__":
    main()
