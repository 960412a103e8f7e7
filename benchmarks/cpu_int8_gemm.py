"""CPU W8A8: torch's int8 GEMM (`torch._int_mm`, oneDNN: VNNI or AMX-int8 where the CPU has them)
beside the bf16 and fp32 GEMMs at SmolLM2-135M's shapes, with and without the per-token activation
quantization and the rescale that `-q int8`'s W8A8 path adds around it (ops.scaled_mm). Medians of
the repeats; on a shared machine read the ratios of one run, not the absolute numbers.
    python benchmarks/cpu_int8_gemm.py [--rows 1,4,16,64,256] [--repeats 21] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from cpu_gemm import SHAPES  # SmolLM2-135M's projections
from cpu_matvec import median_ms  # benchmarks/: one warm-up, then the median of the repeats

from paphos.kernels.cpu import isa
from paphos.ops import scaled_mm

LM_HEAD = (49152, 576)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,16,64,256")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--lm-head", action="store_true", help="add the 49152x576 LM head")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = dict(SHAPES) | ({"lm_head": LM_HEAD} if args.lm_head else {})
    torch.manual_seed(0)
    dense = {k: torch.randn(*s) * 0.05 for k, s in shapes.items()}  # [out, in] fp32
    bf16 = {k: w.bfloat16() for k, w in dense.items()}
    int8 = {k: scaled_mm.quantize_rows_int8(w) for k, w in dense.items()}  # (q [out, in], s)
    flags = isa.cpu_flags()
    vnni = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    print(
        f"# {platform.processor() or platform.machine()}, ISA {isa.selected()}, int8 dot "
        f"products: {vnni or 'none'}; torch {torch.__version__}; {torch.get_num_threads()} threads"
    )
    print("| rows | bf16 ms | fp32 ms | int8 _int_mm ms | W8A8 incl. quant ms | W8A8 / bf16 |")
    print("|---|---|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        x32 = {k: torch.randn(rows, w.shape[1]) for k, w in dense.items()}  # [rows, in]
        x16 = {k: v.bfloat16() for k, v in x32.items()}
        xq = {k: scaled_mm.quantize_tokens_int8(v)[0] for k, v in x32.items()}

        def run_bf16(x16=x16) -> None:
            for k, w in bf16.items():
                F.linear(x16[k], w)

        def run_fp32(x32=x32) -> None:
            for k, w in dense.items():
                F.linear(x32[k], w)

        def run_int_mm(xq=xq) -> None:
            for k, (q, _) in int8.items():
                torch._int_mm(xq[k], q.t())

        def run_w8a8(x16=x16) -> None:
            for k, (q, s) in int8.items():
                scaled_mm.int8_linear(x16[k], q, s, None)

        times = [median_ms(fn, args.repeats) for fn in (run_bf16, run_fp32, run_int_mm, run_w8a8)]
        print(
            f"| {rows} | {times[0]:.3f} | {times[1]:.3f} | {times[2]:.3f} | {times[3]:.3f} | "
            f"{times[3] / times[0]:.2f}x |"
        )


if __name__ == "__main__":
    main()
