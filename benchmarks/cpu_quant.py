"""Workload W through paphos on the default SmolLM2 Q4_1 file twice in one run: kept quantized
(`-q gguf`: the GGUF blocks, C kernels) and dequantized at load (`-q none`: dense weights in the
same dtype, the reference path); one table with the ratios.

    python benchmarks/cpu_quant.py                         # bf16 and fp32, 64 x 128
    python benchmarks/cpu_quant.py --dtypes bfloat16 --num-prompts 16
    python benchmarks/cpu_quant.py --methods int8,none --dtypes bfloat16   # -q int8 (W8A8)

Throughput: output tokens per wall second, all prompts submitted at once. ms/tok: batch 1 (the
latency prompt), mean per output token after the first. Weights: parameter and weight-buffer
bytes after loading. In float32 the greedy outputs are checked against the fp32 reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (  # noqa: E402
    DEFAULT_REFERENCE,
    DEFAULT_WORKLOAD,
    _check_reference,
    load_workload,
    run_paphos,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="", help="a quantized .gguf (default: packaged SmolLM2)")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD)
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument(
        "--methods", default="gguf,none", help="-q values to run; ratios are against none"
    )
    args = parser.parse_args()
    methods = args.methods.split(",")
    if "none" not in methods:
        methods.append("none")
    args.load_format, args.device, args.tensor_parallel_size = "auto", "cpu", 1
    from paphos.config import default_model_path

    model = args.model or default_model_path()
    prompts, max_tokens, latency_index = load_workload(args.workload, args.num_prompts)
    rows = []
    for dtype in args.dtypes.split(","):
        for quantization in methods:
            args.quantization = quantization
            result = run_paphos(model, dtype, prompts, max_tokens, latency_index, args)
            reference = _check_reference(args.reference, dtype, result["outputs"])
            rows.append((dtype, quantization, result, reference))
    print(
        f"\nworkload W: {len(prompts)} prompts x {max_tokens} new tokens, greedy; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {Path(model).name}"
    )
    header = (
        f"{'dtype':9} {'weights':18} {'MiB':>6} {'tok/s':>7} {'ratio':>6} {'ms/tok':>7} "
        f"{'ratio':>6} {'TTFT ms':>8}  fp32 reference"
    )
    print(header)
    print("-" * len(header))
    dense_rows = {dtype: result for dtype, q, result, _ in rows if q == "none"}
    names = {"gguf": "GGUF kept (-q gguf)", "none": "dequantized (none)"}
    for dtype, quantization, result, reference in rows:
        peer = dense_rows[dtype]
        name = names.get(quantization, f"-q {quantization}")
        mib = f"{result['weight_mib']:.1f}" if result["weight_mib"] is not None else "-"
        print(
            f"{dtype:9} {name:18} {mib:>6} {result['tok_s']:7.1f} "
            f"{result['tok_s'] / peer['tok_s']:5.2f}x {result['tpot_ms']:7.2f} "
            f"{result['tpot_ms'] / peer['tpot_ms']:5.2f}x {result['ttft_ms']:8.1f}  {reference}"
        )


if __name__ == "__main__":
    main()
