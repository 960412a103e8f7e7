"""Child of benchmarks/peers.py, run in the llama.cpp venv: workload W through llama-cpp-python,
one sequence at a time, greedy, EOS ignored; prints one JSON line."""

import json
import sys
import time

from llama_cpp import Llama

job = json.load(open(sys.argv[1]))
threads = len(job["cpus"])
llm = Llama(
    model_path=job["model"],
    n_ctx=2048,
    n_batch=512,
    n_threads=threads,
    n_threads_batch=threads,
    verbose=False,
)


def generate(prompt, max_tokens):
    """(seconds to the first token, seconds for the rest, tokens)."""
    start = time.perf_counter()
    first = None
    count = 0
    for _ in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        count += 1
        if first is None:
            first = time.perf_counter()
        if count == max_tokens:
            break
    return first - start, time.perf_counter() - first, count


generate(job["prompts"][0], 4)  # warm-up
start = time.perf_counter()
total = sum(generate(p, job["max_tokens"])[2] for p in job["prompts"])
elapsed = time.perf_counter() - start
ttft, rest, count = generate(job["prompts"][job["latency_index"]], job["max_tokens"])
result = {"tok_s": total / elapsed, "ttft_ms": ttft * 1e3, "tpot_ms": rest / (count - 1) * 1e3}
print("PEER_RESULT", json.dumps(result), flush=True)
