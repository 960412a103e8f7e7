"""The device benchmark, one table: paphos vs HF transformers `generate` on the same random weights,
beside the physical floor (bytes of weights + KV read per decode step / measured copy bandwidth).

    python benchmarks/gpu.py --shapes 1b,8b,qwen3-8b,gemma2-9b --out $OUT/gpu_bench.json

Per shape (Llama-3.2-1B / Llama-3-8B / Qwen3-8B / Gemma-2-9B configs, bf16): HF's model is built
with random weights on the GPU, and paphos (`--load-format dummy`) loads the same tensors through
`load_weights`. Batch 1 and 64: decode ms per step (paphos: median pure-decode step with
overlapped steps, the default, and without; graph replay GPU time; host time; HF: total / new
tokens); throughput at batch 64 and 256 (output tokens / wall s, prompts of 128, 128 new), with
single steps (the server's default) and with multi-step decodes (num_scheduler_steps=8: offline
`LLM`'s default on CUDA); the batch-64 step with both too (per decode step). Target: every shape's
ratios to the floor as the Llama-3-8B shape's (batch 1 within 1.15x, batch 64 within 1.3x).

Mixture-of-experts shapes (Qwen3-30B-A3B, Mixtral-8x7B; `--shapes qwen3-30b-a3b,mixtral-8x7b`):
paphos runs on dummy weights and is closed before HF's random model is built (both would not fit
at once); decode steps at batch 1, 64 and 256. Their floor counts the experts a step reads: per
MoE layer, the expected number of distinct experts the batch's tokens choose under even routing
(E * (1 - (1 - k / E) ** batch), what random weights give), beside every other weight and the KV.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import measure_decode, random_prompts  # noqa: E402

LLAMA_3 = dict(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
# shape -> (transformers config class, its fields): the published configs' shapes
SHAPES = {
    "1b": (
        "LlamaConfig",
        dict(
            LLAMA_3,
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=8192,
            tie_word_embeddings=True,
        ),
    ),
    "8b": (
        "LlamaConfig",
        dict(
            LLAMA_3,
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=14336,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3-8b": (  # q/k norm per head
        "Qwen3Config",
        dict(
            vocab_size=151936,
            max_position_embeddings=40960,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            hidden_size=4096,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=12288,
            tie_word_embeddings=False,
        ),
    ),
    "gemma2-9b": (  # head_dim 256 != hidden / heads, soft-caps, alternating 4096 windows
        "Gemma2Config",
        dict(
            vocab_size=256000,
            max_position_embeddings=8192,
            hidden_size=3584,
            num_hidden_layers=42,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            intermediate_size=14336,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=256,
            sliding_window=4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            tie_word_embeddings=True,
        ),
    ),
}
# transformers config class and shape of each mixture-of-experts benchmark (bf16)
MOE_SHAPES = {
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(
        vocab_size=151936, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, rope_theta=1e6,
        max_position_embeddings=40960, tie_word_embeddings=False,
    )),
    "mixtral-8x7b": ("MixtralConfig", dict(
        vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, num_local_experts=8,
        num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=32768,
        tie_word_embeddings=False,
    )),
}  # fmt: skip
# Given in the issue (H100, HF static cache + torch.compile, batch 1): not rerun by default.
HF_COMPILED_GIVEN = {"1b": 84.7, "8b": 62.5}
PROMPT_LEN, NEW_TOKENS = 128, 128


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy (median of 10)."""
    src = torch.randn(1 << 28, device="cuda")  # [2^28] float32 = 1 GiB
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * (1 << 30) / sorted(times[2:])[len(times[2:]) // 2]


def model_config(shape: str):  # noqa: ANN201 - a transformers PretrainedConfig
    """The config of `shape` (bf16)."""
    import transformers

    class_name, fields = SHAPES[shape] if shape in SHAPES else MOE_SHAPES[shape]
    architecture = class_name.removesuffix("Config") + "ForCausalLM"
    config_class = getattr(transformers, class_name)
    return config_class(
        bos_token_id=1, eos_token_id=2, architectures=[architecture], dtype="bfloat16", **fields
    )


def make_hf(config):  # noqa: ANN001, ANN201 - a transformers model
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):  # random weights, made on the GPU
            return AutoModelForCausalLM.from_config(config).eval()
    finally:
        torch.set_default_dtype(previous)


def make_models(shape: str, workdir: Path):  # noqa: ANN201 - (hf model or None, config)
    """The config saved to `workdir`, and HF's model (None for MoE shapes: made after paphos)."""
    config = model_config(shape)
    config.save_pretrained(workdir)
    return (None if shape in MOE_SHAPES else make_hf(config)), config


def moe_floor_ms(model, config, batch: int, context: int, bandwidth: float) -> float:  # noqa: ANN001
    """paphos's weights read by one decode step of `batch` tokens: all but the routed experts,
    plus per MoE layer the expected distinct experts chosen (even routing), plus the KV."""
    from paphos.layers.moe import FusedMoE

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights -= model.model.embed_tokens.weight.numel() * 2  # a lookup, not a read (untied)
    for layer in (m for m in model.modules() if isinstance(m, FusedMoE)):
        e, k = layer.num_experts, layer.spec.router.top_k
        distinct = e * (1 - (1 - k / e) ** batch)
        weights += layer.expert_bytes() * (distinct / e - 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = batch * context * config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 2
    return 1e3 * (weights + kv) / bandwidth


def floor_ms(hf, config, batch: int, context: int, bandwidth: float) -> float:  # noqa: ANN001
    """Weights read once per step (the input embedding only when it is the tied LM head) plus the
    K and V of every sequence's context."""
    weights = sum(p.numel() * p.element_size() for p in hf.parameters())
    if not config.tie_word_embeddings:
        weights -= hf.model.embed_tokens.weight.numel() * 2
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = batch * context * config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 2
    return 1e3 * (weights + kv) / bandwidth


@torch.inference_mode()
def hf_generate(hf, batch: int, vocab: int) -> dict:  # noqa: ANN001
    ids = torch.tensor(random_prompts(batch, PROMPT_LEN, vocab, 1), device="cuda")  # [b, len]
    kwargs = dict(
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        pad_token_id=0,
        eos_token_id=None,
    )
    hf.generate(ids[:1, :8], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tok_s = out[:, PROMPT_LEN:].numel() / elapsed
    return {"tok_s": tok_s, "ms_per_step": 1e3 * elapsed / NEW_TOKENS}


# Each throughput run gets prompts of its own: the prefix cache keeps the blocks of finished
# requests, and prompts seen before would skip their prefill (before session 4 the batch-256 run's
# first 64 prompts were the batch-64 run's).
_FRESH_SEEDS = itertools.count(1000)


def paphos_throughput(llm, batch: int, vocab: int) -> float:  # noqa: ANN001
    from paphos import SamplingParams

    seed = next(_FRESH_SEEDS)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(batch, PROMPT_LEN, vocab, seed)]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    hits = llm.engine.get_stats().prefix_cache_hits
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    hits = llm.engine.get_stats().prefix_cache_hits - hits
    assert hits == 0, f"{hits} prompt tokens came from the prefix cache: not a cold throughput run"
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def run_shape(shape: str, bandwidth: float, args: argparse.Namespace) -> dict:
    from paphos import LLM

    workdir = Path(tempfile.mkdtemp(prefix=f"paphos_{shape}_"))
    hf, config = make_models(shape, workdir)
    moe = hf is None
    start = time.perf_counter()
    llm = LLM(
        model=str(workdir),
        load_format="dummy",
        dtype="bfloat16",
        skip_tokenizer_init=True,
        max_model_len=2048,
        max_num_seqs=256,
        gpu_memory_utilization=0.9,
        num_scheduler_steps=1,  # the server's default; the "8 steps" rows switch to LLM's
    )
    startup = time.perf_counter() - start
    runner = llm.engine.executor.runner
    loaded = [] if moe else runner.model.load_weights(
        (n, p.detach()) for n, p in hf.state_dict().items()
    )  # fmt: skip
    vocab = config.vocab_size
    row = {"shape": shape, "startup_s": startup, "loaded_tensors": len(loaded)}
    row["decode_batches"] = (1, 64, 256) if moe else (1, 64)

    measure_decode(llm, 1, 16, 4)  # warm-up
    context = PROMPT_LEN + NEW_TOKENS // 2  # mean context of the decode steps
    floor = {
        b: moe_floor_ms(runner.model, config, b, context, bandwidth)
        if moe
        else floor_ms(hf, config, b, context, bandwidth)
        for b in row["decode_batches"]
    }
    executor = llm.engine.executor
    for batch in row["decode_batches"]:
        executor.overlaps_steps = False  # one step at a time, for comparison
        lat = measure_decode(llm, batch, PROMPT_LEN, NEW_TOKENS)
        row[f"b{batch}_serial"] = {**lat, "floor_ms": floor[batch]}
        executor.overlaps_steps = True  # the default on CUDA
        lat = measure_decode(llm, batch, PROMPT_LEN, NEW_TOKENS)
        row[f"b{batch}"] = {**lat, "floor_ms": floor[batch]}
        row[f"kernels_b{batch}"] = kernel_profile(runner, batch, args.out_dir, shape)
    scheduler = llm.engine.scheduler
    single = scheduler.config
    scheduler.config = dataclasses.replace(single, num_scheduler_steps=MULTI_STEPS)
    row["b64_multi"] = {**measure_decode(llm, 64, PROMPT_LEN, NEW_TOKENS), "floor_ms": floor[64]}
    for batch in (64, 256):
        row[f"tput{batch}_multi"] = paphos_throughput(llm, batch, vocab)
    scheduler.config = single
    if args.out_dir is not None:
        host_profile(llm, args.out_dir / f"host_profile_{shape}_b64.txt")
    for batch in (64, 256):
        row[f"tput{batch}"] = paphos_throughput(llm, batch, vocab)
    row["host"] = {
        "steps": runner.host_stats.num_steps,
        "graph_steps": runner.host_stats.num_graph_steps,
        "mean_prepare_ms": runner.host_stats.mean_prepare_ms,
    }
    llm.close()
    del llm, runner
    torch.cuda.empty_cache()
    if moe and not args.skip_hf:
        hf = make_hf(config)
    if not args.skip_hf:
        row["hf"] = {b: hf_generate(hf, b, vocab) for b in (1, 64, 256)}
    del hf
    torch.cuda.empty_cache()
    return row


def host_profile(llm, path: Path) -> None:  # noqa: ANN001
    """cProfile of 32 decode steps at batch 64 (host functions by own time), written to path."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    measure_decode(llm, 64, PROMPT_LEN, 32)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
    path.write_text(text.getvalue())


KERNEL_GROUPS = (
    ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "splitk")),
    ("attention", ("attention", "attn", "decode", "merge")),
    ("norm/rope/act/kv", ("rms", "rotary", "silu", "kv_kernel", "write_kv")),
    ("moe experts", ("_gate_up_kernel", "_down_kernel")),  # paphos.kernels.fused_moe
    ("moe routing", ("topk", "sort", "scatter", "searchsorted", "softmax", "sigmoid")),
)


def kernel_profile(runner, batch: int, out_dir: Path | None, shape: str) -> dict:  # noqa: ANN001
    """GPU time per kernel group over 10 replays of the decode graph of this batch size (the
    profiler sees the kernels inside the graph); the full kernel table goes to out_dir."""
    from torch.profiler import ProfilerActivity, profile

    bucket = runner.graphs.bucket_for(batch) if runner.graphs is not None else None
    if bucket is None:
        return {}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            runner.graphs.replay(bucket)
        torch.cuda.synchronize()
    groups: dict[str, float] = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0)
        name = event.key.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + us / 10 / 1e3  # ms per replay
    if out_dir is not None:
        table = prof.key_averages().table(sort_by="device_time_total", row_limit=25)
        with open(out_dir / f"kernels_{shape}.txt", "a") as f:  # one file per shape (b1, b64)
            f.write(f"\n## {shape}, batch {batch}, 10 replays\n{table}\n")
    return groups


_DECODE_ROWS = (
    ("b{b}", "decode step ms, batch {b}"),
    ("b{b}_serial", "  same, steps not overlapped"),
)
MULTI_STEPS = 8  # --num-scheduler-steps of the multi-step rows (paphos.engine.llm's default)


def print_table(rows: list[dict], bandwidth: float) -> None:
    print(
        f"\n{torch.cuda.get_device_name()}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
        f"prompts {PROMPT_LEN}, {NEW_TOKENS} new tokens, greedy, bf16"
    )
    head = (
        f"{'shape':9} {'metric':28} {'paphos':>9} {'GPU(replay)':>11} {'host':>6} "
        f"{'floor':>7} {'x floor':>7} {'HF':>8} {'vs HF':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        hf = r.get("hf", {})
        batches = r.get("decode_batches", (1, 64))
        for b, key, label in [(b, k, lb) for b in batches for k, lb in _DECODE_ROWS]:
            lat = r[key.format(b=b)]
            host = lat["schedule_ms"] + lat["prepare_ms"]
            theirs = hf.get(b, {}).get("ms_per_step", float("nan"))
            print(
                f"{r['shape']:9} {label.format(b=b):28} {lat['decode_step_ms']:9.3f} "
                f"{lat['replay_ms']:11.3f} {host:6.3f} {lat['floor_ms']:7.3f} "
                f"{lat['decode_step_ms'] / lat['floor_ms']:7.2f} {theirs:8.2f} "
                f"{theirs / lat['decode_step_ms']:6.1f}x"
            )
        lat = r["b64_multi"]
        theirs = hf.get(64, {}).get("ms_per_step", float("nan"))
        print(
            f"{r['shape']:9} {f'  same, {MULTI_STEPS} steps per schedule':28} "
            f"{lat['decode_step_ms']:9.3f} {lat['replay_ms']:11.3f} "
            f"{lat['schedule_ms'] + lat['prepare_ms']:6.3f} {lat['floor_ms']:7.3f} "
            f"{lat['decode_step_ms'] / lat['floor_ms']:7.2f} {theirs:8.2f} "
            f"{theirs / lat['decode_step_ms']:6.1f}x"
        )
        for b in (64, 256):
            theirs = hf.get(b, {}).get("tok_s", float("nan"))
            for key, label in ((f"tput{b}", ""), (f"tput{b}_multi", f", {MULTI_STEPS} steps")):
                print(
                    f"{r['shape']:9} {f'output tok/s, batch {b}{label}':28} {r[key]:9.0f} "
                    f"{'':>11} {'':>6} {'':>7} {'':>7} {theirs:8.0f} {r[key] / theirs:6.1f}x"
                )
        b1 = 1e3 / r["b1"]["decode_step_ms"]
        theirs = hf.get(1, {}).get("tok_s", float("nan"))
        print(
            f"{r['shape']:9} {'tok/s batch 1':28} {b1:9.1f} {'':>11} {'':>6} {'':>7} {'':>7} "
            f"{theirs:8.1f} {b1 / theirs:6.1f}x"
        )
        for b in batches:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r[f"kernels_b{b}"].items()))
            lat = r[f"b{b}"]
            print(
                f"{r['shape']:9}   batch {b}: GPU ms per replay by kernel group: {parts}; "
                f"host ms: schedule {lat['schedule_ms']:.3f}, "
                f"runner prepare {lat['prepare_ms']:.3f}, "
                f"engine update+outputs {lat['engine_rest_ms']:.3f}"
            )
        given = HF_COMPILED_GIVEN.get(r["shape"])
        if given is None:
            continue
        print(
            f"{r['shape']:9} {'HF static+compile b1 (given)':28} {'':>9} {'':>11} {'':>6} "
            f"{'':>7} {'':>7} {given:8.1f} {b1 / given:6.1f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shapes", default="1b,8b")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write every number as JSON here")
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        help="run without this Triton kernel of paphos.kernels.CUDA_KERNELS (e.g. skinny_gemm: "
        "cuBLAS instead), to compare",
    )
    parser.add_argument(
        "--no-pdl",
        action="store_true",
        help="launch the Triton kernels without programmatic dependent launch (PAPHOS_PDL=0)",
    )
    args = parser.parse_args()
    if args.no_pdl:
        os.environ["PAPHOS_PDL"] = "0"
        print("without programmatic dependent launch")
    from paphos.kernels import CUDA_KERNELS

    for name in args.without:
        CUDA_KERNELS.pop(name)
        print(f"without the {name} kernel")
    args.out_dir = args.out.parent if args.out else None
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device")
    bandwidth = copy_bandwidth()
    rows = []
    for shape in args.shapes.split(","):
        rows.append(run_shape(shape, bandwidth, args))
        if args.out:
            args.out.write_text(json.dumps({"bandwidth": bandwidth, "rows": rows}, indent=1))
        print_table(rows, bandwidth)


if __name__ == "__main__":
    main()
