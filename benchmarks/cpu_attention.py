"""Time SmolLM2-135M's attention on the CPU: the torch reference against the AVX2 kernel that reads
K/V in place from the paged cache (paphos/kernels/cpu/attention.c).

Shapes: 9 query heads, 3 kv heads, head 64, block 16. Each case gets enough DISTINCT layer caches
(up to 30) to exceed the L3, cycled as decode cycles its layers; blocks are handed out shuffled.
Prints one table of median ms per layer call.
Usage: python benchmarks/cpu_attention.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from paphos.kernels.cpu import attention
from paphos.ops.paged_attention import paged_attention as reference

NUM_HEADS, NUM_KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 9, 3, 64, 16
MAX_LAYERS = 30
L3_BYTES = 32 * 2**20
CASES: dict[str, list[tuple[int, int]]] = {  # name -> (q_len, seq_len) per sequence
    "decode b1 ctx200": [(1, 200)],
    "decode b1 ctx2000": [(1, 2000)],
    "decode b64 ctx~190": [(1, 160 + (b * 29) % 61) for b in range(64)],
    "prefill 512": [(512, 512)],
    "b63 decode + chunk 256": [(1, 190)] * 63 + [(256, 700)],
}


def make_step(specs: list[tuple[int, int]], dtype: torch.dtype, gen: torch.Generator):
    """(query, query_start_loc, seq_lens, block_tables, num_blocks) of one step."""
    blocks_per_seq = [-(-seq_len // BLOCK_SIZE) for _, seq_len in specs]
    num_blocks = sum(blocks_per_seq)
    order = torch.randperm(num_blocks, generator=gen)  # [num_blocks]
    block_tables = torch.zeros(len(specs), max(blocks_per_seq), dtype=torch.int64)  # [seqs, max]
    used = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = order[used : used + n]
        used += n
    q_lens = torch.tensor([q for q, _ in specs])  # [num_seqs]
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)])  # [seqs+1]
    seq_lens = torch.tensor([s for _, s in specs])  # [num_seqs]
    query = torch.randn(int(q_lens.sum()), NUM_HEADS, HEAD_SIZE, generator=gen)  # [tokens, h, d]
    return query.to(dtype), query_start_loc, seq_lens, block_tables, num_blocks


def make_caches(num_blocks: int, dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    shape = (2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_SIZE)
    one_bytes = 2 * num_blocks * BLOCK_SIZE * NUM_KV_HEADS * HEAD_SIZE * dtype.itemsize
    count = min(MAX_LAYERS, 1 + 2 * L3_BYTES // one_bytes)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(count)]  # [2, blocks, ...]


def median_ms_per_call(fn: Callable[[torch.Tensor], object], caches, repeats: int) -> float:
    for cache in caches:  # warm-up: first touch, library load, thread pool start
        fn(cache)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for cache in caches:
            fn(cache)
        times.append((time.perf_counter() - start) * 1e3 / len(caches))
    return statistics.median(times)


def time_case(specs: list[tuple[int, int]], dtype: torch.dtype, repeats: int) -> list[float]:
    gen = torch.Generator().manual_seed(0)
    query, starts, lens, tables, num_blocks = make_step(specs, dtype, gen)
    caches = make_caches(num_blocks, dtype, gen)
    scale = HEAD_SIZE**-0.5
    lib = attention.load_library()
    ref = median_ms_per_call(
        lambda c: reference(query, c, starts, lens, tables, scale), caches, repeats
    )
    fast = median_ms_per_call(
        lambda c: attention.launch(lib, query, c, starts, lens, tables, scale), caches, repeats
    )
    return [ref, fast]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if attention.load_library() is None:
        raise SystemExit("the attention kernel is unavailable here (see the warning above)")
    print(f"threads={torch.get_num_threads()} repeats={args.repeats} (median ms per layer call)")
    print(f"{'dtype':9} {'case':24} {'torch ms':>9} {'kernel ms':>10} {'speed-up':>8}")
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float32):
            for name, specs in CASES.items():
                ref, fast = time_case(specs, dtype, args.repeats)
                print(f"{str(dtype)[6:]:9} {name:24} {ref:9.3f} {fast:10.3f} {ref / fast:7.2f}x")


if __name__ == "__main__":
    main()
