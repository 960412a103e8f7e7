"""Child of benchmarks/peers.py, run in the llama.cpp venv: workload W through llama-cpp-python,
greedy, EOS ignored; prints one JSON line.

Throughput: all prompts as parallel sequences of one llama.cpp context (its low-level batch API:
one `llama_decode` per step over every sequence, a unified KV cache), as llama.cpp's own
`llama-batched`/server do; latency: the prompt alone through the high-level `Llama.generate`."""

import ctypes
import json
import sys
import time

import llama_cpp
import numpy as np
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


class Batched:
    """Greedy decoding of many sequences at once in one context (sequence i = prompt i)."""

    def __init__(self, num_seqs: int, n_ctx: int, n_batch: int) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
        params.n_seq_max, params.kv_unified = num_seqs, True
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(llm.model, params)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
        self.n_batch = n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def decode(self, entries) -> list[int]:
        """entries: (token, pos, seq, wants_logits) -> the greedy next token of each entry that
        wants logits, in order; in chunks of n_batch tokens."""
        picked = []
        for at in range(0, len(entries), self.n_batch):
            chunk = entries[at : at + self.n_batch]
            b = self.batch
            b.n_tokens = len(chunk)
            for i, (token, pos, seq, logits) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i] = token, pos, 1
                b.seq_id[i][0], b.logits[i] = seq, logits
            if llama_cpp.llama_decode(self.ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
            for i, entry in enumerate(chunk):
                if entry[3]:
                    row = llama_cpp.llama_get_logits_ith(self.ctx, i)
                    values = np.ctypeslib.as_array(
                        ctypes.cast(row, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,)
                    )
                    picked.append(int(values.argmax()))
        return picked

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)

    def run(self, prompts, max_tokens: int) -> int:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        entries = [
            (t, pos, seq, pos == len(p) - 1)
            for seq, p in enumerate(prompts)
            for pos, t in enumerate(p)
        ]
        last = self.decode(entries)
        count = len(last)
        for step in range(1, max_tokens):
            entries = [
                (t, len(p) + step - 1, seq, True) for seq, (t, p) in enumerate(zip(last, prompts))
            ]
            last = self.decode(entries)
            count += len(last)
        return count


prompts = job["prompts"]
longest = max(len(p) for p in prompts) + job["max_tokens"]
batched = Batched(len(prompts), n_ctx=len(prompts) * longest, n_batch=512)
batched.run(prompts[:1], 4)  # warm-up
start = time.perf_counter()
total = batched.run(prompts, job["max_tokens"])
elapsed = time.perf_counter() - start
batched.close()  # its thread pool would compete with the latency run's
generate(prompts[0], 4)  # warm-up
ttft, rest, count = generate(prompts[job["latency_index"]], job["max_tokens"])
result = {"tok_s": total / elapsed, "ttft_ms": ttft * 1e3, "tpot_ms": rest / (count - 1) * 1e3}
print("PEER_RESULT", json.dumps(result), flush=True)
