"""Time SmolLM2-135M's batch-1 linears on the CPU: torch's F.linear against the AVX2 matvec kernel.

Weights are 30 layers' worth of DISTINCT tensors (plus the LM head), so every pass streams them from
memory as decode does. Prints one table of median ms per pass and the weight-read rate in GB/s.
Usage: python benchmarks/cpu_matvec.py [--repeats 7] [--rows 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from paphos.kernels.cpu import matvec

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


def pass_fn(weights: list[torch.Tensor], rows: int, dtype: torch.dtype, use_kernel: bool):
    lib = matvec.load_library()
    threads = torch.get_num_threads()
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]).to(dtype) for w in weights}  # [rows, in]

    def run() -> None:
        for w in weights:
            x = inputs[w.shape[1]]
            if use_kernel:
                matvec.matvec(lib, x, w, None, threads)
            else:
                F.linear(x, w)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", type=int, default=1, choices=range(1, matvec.MAX_ROWS + 1))
    args = parser.parse_args()
    if matvec.load_library() is None:
        raise SystemExit("the matvec kernel is unavailable here (see the warning above)")
    print(f"threads={torch.get_num_threads()} rows={args.rows} repeats={args.repeats} (median)")
    print(
        f"{'dtype':9} {'weights':10} {'MB':>6} {'torch ms':>9} {'GB/s':>6} {'kernel ms':>10} "
        f"{'GB/s':>6} {'speed-up':>8}"
    )
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float32):
            for name, weights in make_weights(dtype).items():
                mb = sum(w.numel() * w.element_size() for w in weights) / 1e6
                ms = [
                    median_ms(pass_fn(weights, args.rows, dtype, k), args.repeats)
                    for k in (False, True)
                ]
                print(
                    f"{str(dtype)[6:]:9} {name:10} {mb:6.0f} {ms[0]:9.2f} {mb / ms[0]:6.1f} "
                    f"{ms[1]:10.2f} {mb / ms[1]:6.1f} {ms[0] / ms[1]:7.2f}x"
                )


if __name__ == "__main__":
    main()
