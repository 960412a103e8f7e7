"""Time SmolLM2-135M's batch-1 linears on the CPU: torch's F.linear against the matvec kernel at
each ISA level this CPU has (avx2, avx512, avx512_bf16).

Weights are 30 layers' worth of DISTINCT tensors (plus the LM head), so every pass streams them from
memory as decode does. Prints one table of median ms per pass, the weight-read rate in GB/s and
each level's speed-up over torch.
Usage: python benchmarks/cpu_matvec.py [--repeats 7] [--rows 1] [--levels avx2,avx512_bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from paphos.kernels.cpu import isa, matvec

NUM_LAYERS = 30
HIDDEN = 576
LAYER_SHAPES = [(960, HIDDEN), (HIDDEN, HIDDEN), (3072, HIDDEN), (HIDDEN, 1536)]  # [out, in]
LM_HEAD_SHAPE = (49152, HIDDEN)


def make_weights(dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    layers = [
        torch.randn(shape, generator=gen).mul_(0.02).to(dtype)  # [out, in]
        for _ in range(NUM_LAYERS)
        for shape in LAYER_SHAPES
    ]
    lm_head = [torch.randn(LM_HEAD_SHAPE, generator=gen).mul_(0.02).to(dtype)]  # [vocab, hidden]
    return {"30 layers": layers, "lm_head": lm_head}


def median_ms(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up: first-touch, library load, thread pool start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def pass_fn(weights: list[torch.Tensor], rows: int, dtype: torch.dtype, level: str | None):
    """One pass over `weights`: torch's F.linear (level None) or the kernel built for `level`."""
    lib = None if level is None else matvec.load_library(level)
    threads = torch.get_num_threads()
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]).to(dtype) for w in weights}  # [rows, in]

    def run() -> None:
        for w in weights:
            x = inputs[w.shape[1]]
            if lib is not None:
                matvec.matvec(lib, x, w, None, threads)
            else:
                F.linear(x, w)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", type=int, default=1, choices=range(1, matvec.MAX_ROWS + 1))
    parser.add_argument("--levels", default=",".join(isa.available()))
    args = parser.parse_args()
    levels = [level for level in args.levels.split(",") if level]
    if not levels or any(matvec.load_library(level) is None for level in levels):
        raise SystemExit("the matvec kernel is unavailable here (see the warning above)")
    print(f"threads={torch.get_num_threads()} rows={args.rows} repeats={args.repeats} (median)")
    header = "".join(f" {level + ' ms':>16} {'GB/s':>6} {'x':>6}" for level in levels)
    print(f"{'dtype':9} {'weights':10} {'MB':>6} {'torch ms':>9} {'GB/s':>6}{header}")
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float32):
            for name, weights in make_weights(dtype).items():
                mb = sum(w.numel() * w.element_size() for w in weights) / 1e6
                torch_ms = median_ms(pass_fn(weights, args.rows, dtype, None), args.repeats)
                row = f"{str(dtype)[6:]:9} {name:10} {mb:6.0f} {torch_ms:9.2f} {mb / torch_ms:6.1f}"
                for level in levels:
                    ms = median_ms(pass_fn(weights, args.rows, dtype, level), args.repeats)
                    row += f" {ms:16.2f} {mb / ms:6.1f} {torch_ms / ms:5.2f}x"
                print(row)


if __name__ == "__main__":
    main()
