"""Sampler cost per step: a batch of 256 rows with every sampler on vs all greedy (CPU, and CUDA
when available). Run: python benchmarks/sampler.py [--vocab 32000] [--history 512] [--steps 10]"""

from __future__ import annotations

import argparse
import random
import time

import torch

from paphos.layers.sampler import RequestSamplingState, Sampler, SamplingMetadata
from paphos.sampling_params import SamplingParams

ALL_ON = dict(
    temperature=0.9,
    dynatemp_min=0.5,
    dynatemp_max=1.5,
    top_p=0.95,
    top_k=200,
    top_a=0.01,
    min_p=0.02,
    tfs=0.98,
    eta_cutoff=2.0,
    epsilon_cutoff=2.0,
    typical_p=0.98,
    smoothing_factor=0.2,
    xtc_probability=0.5,
    nsigma=2.5,
    skew=0.2,
    presence_penalty=0.2,
    frequency_penalty=0.2,
    repetition_penalty=1.1,
    no_repeat_ngram_size=4,
    dry_multiplier=0.8,
    dry_sequence_breakers=[],
    dry_sequence_breaker_ids=[0, 1],
    mirostat_mode=2,
    mirostat_tau=5.0,
    mirostat_eta=0.1,
    logprobs=5,
)


def _states(
    params: SamplingParams, batch: int, vocab: int, history: int, device: torch.device
) -> list[RequestSamplingState]:
    rng = random.Random(0)
    return [
        RequestSamplingState(
            params,
            [rng.randrange(vocab) for _ in range(history)],
            [rng.randrange(vocab) for _ in range(16)],
            2,
            vocab,
            device,
        )
        for _ in range(batch)
    ]


def time_step(params: SamplingParams, args: argparse.Namespace, device: torch.device) -> float:
    """Mean seconds per step: SamplingMetadata.build plus Sampler.forward."""
    states = _states(params, args.batch, args.vocab, args.history, device)
    sampler = Sampler()
    logits = torch.randn(args.batch, args.vocab, device=device)  # [batch, vocab]
    for _ in range(2):  # warm-up
        sampler(logits, SamplingMetadata.build(states, args.vocab, device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        out = sampler(logits, SamplingMetadata.build(states, args.vocab, device))
        out.sampled_token_ids.tolist()  # what the runner does; also syncs the device
    return (time.perf_counter() - start) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--history", type=int, default=512, help="prompt tokens per row")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    cases = {
        "greedy": SamplingParams(temperature=0),
        "all samplers, unseeded": SamplingParams(**ALL_ON),
        "all samplers, seeded": SamplingParams(seed=1, **ALL_ON),
    }
    print(f"batch={args.batch} vocab={args.vocab} history={args.history + 16} tokens/row")
    for device in devices:
        for name, params in cases.items():
            ms = time_step(params, args, device) * 1e3
            print(f"{device.type:5s} {name:24s} {ms:9.2f} ms/step")


if __name__ == "__main__":
    main()
