"""The engine seed makes unseeded sampling repeat run to run; `model` may be an os.PathLike.
Checked on the shared random tiny Llama (flat distributions, so temperature 1 really samples)."""

from __future__ import annotations

from pathlib import Path

from paphos import LLM, SamplingParams

PROMPTS = [{"prompt_token_ids": [5, 9, 17, 33]}, {"prompt_token_ids": [40, 41]}]


def _sample(model, seed: int, request_seed: int | None = None) -> list[list[int]]:
    sampling = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True, seed=request_seed)
    with LLM(
        model=model,
        seed=seed,
        dtype="float32",
        skip_tokenizer_init=True,
        kv_cache_space=0.01,
        device="cpu",
    ) as llm:
        outputs = llm.generate(PROMPTS, sampling, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_same_engine_seed_gives_same_tokens_and_another_seed_differs(tiny_llama_dir) -> None:
    first = _sample(str(tiny_llama_dir), seed=0)
    assert _sample(str(tiny_llama_dir), seed=0) == first
    assert _sample(str(tiny_llama_dir), seed=1) != first


def test_request_seed_still_decides_its_samples(tiny_llama_dir) -> None:
    by_request = _sample(str(tiny_llama_dir), seed=0, request_seed=3)
    assert _sample(str(tiny_llama_dir), seed=1, request_seed=3) == by_request


def test_model_may_be_a_pathlib_path(tiny_llama_dir) -> None:
    assert _sample(Path(tiny_llama_dir), seed=0) == _sample(str(tiny_llama_dir), seed=0)
