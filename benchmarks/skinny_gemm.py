"""Batched-decode linear layers on CUDA (2-64 rows): cuBLAS (F.linear) vs the Triton skinny GEMM
(paphos.kernels.skinny_gemm) for every config of its SWEEP, on Llama-3.2-1B and Llama-3-8B weight
shapes (bf16), weights cycled through more copies than L2 holds, inside a CUDA graph (as a decode
step replays them). One table: the best config per shape and row count, bandwidth, the ratio;
every timing to --out as JSON.

    python benchmarks/skinny_gemm.py --out $OUT/skinny_gemm.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv import SHAPES, time_us  # noqa: E402

from paphos.kernels.skinny_gemm import SWEEP, candidates, skinny_gemm  # noqa: E402

ROWS = (16, 32, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    head = (
        f"{'shape':12} {'M':>3} {'cuBLAS us':>9} {'TB/s':>5} {'best config':>26} {'us':>7} "
        f"{'TB/s':>5} {'ratio':>6} {'rel err':>8}"
    )
    print(head)
    results = []
    for name, (n, k) in SHAPES.items():
        copies = max(2, int(400e6 // (n * k * 2)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        nbytes = n * k * 2
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)  # [M, K]
            ref = F.linear(x.double(), weights[0].double())  # [M, N]
            base = time_us(F.linear, weights, x)
            timings = {}
            for config in candidates(m, n, k, SWEEP):
                try:
                    timings[config] = time_us(
                        lambda a, b, c=config: skinny_gemm(a, b, None, c), weights, x
                    )
                except OutOfResources:
                    print(f"  {config}: out of shared memory")
            best = min(timings, key=timings.__getitem__)
            out = skinny_gemm(x, weights[0], None, best).double()
            err = ((out - ref).norm() / ref.norm()).item()
            us = timings[best]
            print(
                f"{name:12} {m:3} {base:9.2f} {nbytes / base / 1e6:5.2f} {str(tuple(best)):>26} "
                f"{us:7.2f} {nbytes / us / 1e6:5.2f} {base / us:6.2f} {err:8.1e}"
            )
            ranked = sorted(timings.items(), key=lambda kv: kv[1])
            results.append(
                {
                    "shape": name,
                    "m": m,
                    "cublas_us": base,
                    "rel_err": err,
                    "configs": [[list(c), t] for c, t in ranked],
                }
            )
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
        del weights


if __name__ == "__main__":
    main()
