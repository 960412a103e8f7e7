"""Batch-1 linear layers on CUDA: cuBLAS (F.linear) vs the Triton GEMV (paphos.kernels.gemv) for
each tile config, on Llama-3.2-1B and Llama-3-8B weight shapes (bf16), weights cycled through more
copies than L2 holds, inside a CUDA graph (as a decode step replays them), one table with bandwidth
and the ratio.

    python benchmarks/gemv.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from paphos.kernels.gemv import CONFIGS, gemv
from paphos.kernels.skinny_gemm import graph_time_us

SHAPES = {
    "1b qkv": (3072, 2048),
    "1b o": (2048, 2048),
    "1b gate_up": (16384, 2048),
    "1b down": (2048, 8192),
    "1b lm_head": (128256, 2048),
    "8b qkv": (6144, 4096),
    "8b o": (4096, 4096),
    "8b gate_up": (28672, 4096),
    "8b down": (4096, 14336),
    "8b lm_head": (128256, 4096),
}


def time_us(fn, weights, x) -> float:  # noqa: ANN001
    """GPU time of one fn(x, weight), in microseconds: a CUDA graph of one pass over every weight
    copy (as a decode step replays them), median over replays / copies (the timing the skinny
    GEMM's own config choice uses)."""
    return graph_time_us(lambda w: fn(x, w), weights)


def main() -> None:
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}")
    print(
        f"{'shape':12} {'cuBLAS us':>9} {'TB/s':>5} {'best triton':>16} {'us':>7} {'TB/s':>5} "
        f"{'ratio':>6} {'max rel err':>11}"
    )
    for name, (n, k) in SHAPES.items():
        copies = max(2, int(400e6 // (n * k * 2)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), weights[0].float())
        base = time_us(F.linear, weights, x)
        best = None
        for config in CONFIGS:
            us = time_us(lambda a, b, c=config: gemv(a, b, None, c), weights, x)
            if best is None or us < best[1]:
                best = (config, us)
        err = (gemv(x, weights[0], None, best[0]).float() - ref).abs().max() / ref.abs().max()
        nbytes = n * k * 2
        print(
            f"{name:12} {base:9.2f} {nbytes / base / 1e6:5.2f} {str(best[0]):>16} "
            f"{best[1]:7.2f} {nbytes / best[1] / 1e6:5.2f} {base / best[1]:6.2f} {err:11.2e}"
        )
        del weights
    # argmax of one and 64 rows of logits: torch.argmax vs the two-stage version
    for rows in (1, 64):
        logits = torch.randn(rows, 128256, device="cuda")
        from paphos.ops.argmax import argmax_rows

        assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))
        a = time_us(lambda x, w: x.argmax(dim=-1), [None] * 20, logits)
        b = time_us(lambda x, w: argmax_rows(x), [None] * 20, logits)
        print(f"argmax [{rows}, 128256]: torch {a:.2f} us, two-stage {b:.2f} us")


if __name__ == "__main__":
    main()
