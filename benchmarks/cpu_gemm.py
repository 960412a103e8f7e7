"""Batched CPU products for bf16 weights: torch's bf16 GEMM (oneDNN: AVX-512 BF16 or AMX where the
CPU has them) beside the fp32 GEMM over an fp32 copy of the weights (ops/dense.py's choice on CPUs
without native bf16) and oneDNN's linear over weights prepacked once (torch.utils.mkldnn), at
SmolLM2-135M's shapes; one table, with the ratios and which one ops.dense picks on this CPU.
    python benchmarks/cpu_gemm.py [--rows 8,64,256] [--repeats 7]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torch.utils.mkldnn as mkldnn
from cpu_matvec import median_ms  # benchmarks/: one warm-up, then the median of the repeats
from torch import nn

from paphos.kernels.cpu import isa
from paphos.ops import dense

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def products(x: torch.Tensor, weights: list[torch.Tensor], out_dtype: torch.dtype | None):
    def run() -> None:
        for w in weights:
            y = F.linear(x, w)
            if out_dtype is not None:
                y.to(out_dtype)

    return run


def prepacked(weight: torch.Tensor) -> nn.Module:
    """oneDNN's linear with the weight reordered once into its blocked layout."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    return mkldnn.to_mkldnn(linear, weight.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="8,64,256")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    picks = "fp32 copy" if dense.wants_fp32_copy(torch.empty(1, dtype=torch.bfloat16)) else "bf16"
    capability = torch.backends.cpu.get_cpu_capability()
    print(
        f"ISA {isa.selected()}, torch {torch.__version__} ({capability}), "
        f"{torch.get_num_threads()} threads; ops.dense uses: {picks}"
    )
    print(
        f"{'rows':>5} {'layer (x30)':12} {'bf16 ms':>9} {'fp32 ms':>9} {'prepacked':>10} "
        f"{'bf16/fp32':>10} {'packed/fp32':>12}"
    )
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            for name, (out, inp) in SHAPES.items():
                weights = [torch.randn(out, inp, generator=gen).bfloat16() for _ in range(30)]
                copies = [w.float() for w in weights]
                x = torch.randn(rows, inp, generator=gen).bfloat16()  # [rows, in]
                x32 = x.float()
                packed = [prepacked(w) for w in weights]
                bf16 = median_ms(products(x, weights, None), args.repeats)
                fp32 = median_ms(products(x32, copies, torch.bfloat16), args.repeats)
                pack = median_ms(lambda layers=packed, x=x: [f(x) for f in layers], args.repeats)
                print(
                    f"{rows:5} {name:12} {bf16:9.2f} {fp32:9.2f} {pack:10.2f} "
                    f"{bf16 / fp32:9.2f}x {pack / fp32:11.2f}x"
                )


if __name__ == "__main__":
    main()
