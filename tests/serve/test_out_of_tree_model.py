"""The out-of-tree example model (examples/out_of_tree_model, GPT-NeoX) of docs/adding_a_model.md:
registered from outside paphos (nothing installed: PYTHONPATH, then the runpy way or a plugin entry
point), it matches transformers' logits and is served by `paphos run` at TP=1 and TP=2 to the
`openai` client; an invalid class is refused with the documented message."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
import torch
from server_utils import ServerProcess, free_port

from paphos.config import EngineConfig
from paphos.layers.sampler import RequestSamplingState
from paphos.models.registry import ModelRegistry
from paphos.runner.inputs import RunnerRequestState, build_step_inputs
from paphos.runner.model_runner import ModelRunner
from paphos.sampling_params import SamplingParams

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "out_of_tree_model"
PROMPT_IDS = [40, 41, 42, 43, 44, 45, 46, 47, 48]
NUM_NEW_TOKENS = 8
RUNPY_SERVER = (
    "from paphos_example_model import register; register(); import runpy; "
    "runpy.run_module('paphos.serve.cli', run_name='__main__')"
)
SERVER_ARGS = [
    *("--device", "cpu", "--dtype", "float32", "--kv-cache-space", "0.01"),
    *("--uvicorn-log-level", "warning", "--served-model-name", "tiny-neox"),
]


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    """A random tiny GPT-NeoX (partial rotary, parallel residual) with the tiny tokenizer."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    path = tmp_path_factory.mktemp("tiny_neox")
    config = GPTNeoXConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=256,
        rotary_pct=0.5,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).float().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _hf_greedy(model_dir: Path) -> tuple[torch.Tensor, list[int]]:
    """transformers' logits of the prompt and its greedy continuation (EOS not special-cased)."""
    from transformers import GPTNeoXForCausalLM

    hf = GPTNeoXForCausalLM.from_pretrained(model_dir).float().eval()
    tokens = list(PROMPT_IDS)
    with torch.no_grad():
        prompt_logits = hf(torch.tensor([tokens])).logits[0]  # [num_prompt, vocab]
        for _ in range(NUM_NEW_TOKENS):
            tokens.append(int(hf(torch.tensor([tokens])).logits[0, -1].argmax()))
    return prompt_logits, tokens[len(PROMPT_IDS) :]


def test_example_model_registered_from_outside_matches_transformers_logits(neox_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE_DIR))
    # the example replaces the built-in GPT-NeoX: only for this test
    monkeypatch.setattr(ModelRegistry, "_models", dict(ModelRegistry._models))
    from paphos_example_model import ARCHITECTURE, register

    register()
    assert ModelRegistry.resolve(ARCHITECTURE).__module__ == "paphos_example_model.gpt_neox"
    config = EngineConfig.from_kwargs(
        model=str(neox_dir),
        dtype="float32",
        skip_tokenizer_init=True,
        device="cpu",
        num_blocks_override=4,
        num_threads=1,
    )
    runner = ModelRunner(config)
    runner.initialize_kv_cache(4)
    params = SamplingParams(temperature=0)
    sampling = RequestSamplingState(params, PROMPT_IDS, [], None, runner.vocab_size, runner.device)
    state = RunnerRequestState("a", list(PROMPT_IDS), len(PROMPT_IDS), [[0]], 0, sampling)
    inputs = build_step_inputs([state], [len(PROMPT_IDS)], config.cache.block_size, runner.device)
    every_token = torch.arange(len(PROMPT_IDS))  # [num_prompt]
    metadata = dataclasses.replace(inputs.attn_metadata, logits_indices=every_token)
    with torch.inference_mode():
        hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, metadata)
        ours = runner.model.compute_logits(hidden, metadata)  # [num_prompt, vocab]
    expected, _ = _hf_greedy(neox_dir)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


class ExampleServer(ServerProcess):
    """`paphos run` of the example model from outside paphos, registered `how`."""

    def __init__(self, model_dir: Path, how: str, tp: int, tmp_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = str(tmp_path / "server.log")
        if how == "runpy":
            command = [sys.executable, "-c", RUNPY_SERVER]
            python_path = [str(EXAMPLE_DIR)]
        else:
            command = [sys.executable, "-m", "paphos.serve.cli"]
            python_path = [str(EXAMPLE_DIR), str(_entry_point_dir(tmp_path))]
        args = [str(model_dir), *SERVER_ARGS, "--tensor-parallel-size", str(tp)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(python_path))
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [*command, "run", *args, "--port", str(self.port)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_healthy(180.0)


def _entry_point_dir(tmp_path: Path) -> Path:
    """A .dist-info declaring the example's `paphos.plugins` entry point, as `pip install` would."""
    root = tmp_path / "site"
    info = root / "paphos_example_model-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: paphos-example-model\n"
                                   "Version: 0.1.0\n")  # fmt: skip
    (info / "entry_points.txt").write_text(
        "[paphos.plugins]\ngpt_neox = paphos_example_model:register\n"
    )
    return root


def _wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    alive = processes
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    return alive


@pytest.mark.parametrize("how, tp", [("runpy", 1), ("runpy", 2), ("entry_point", 2)])
def test_paphos_run_serves_the_example_model_to_the_openai_client(neox_dir, tmp_path, how, tp):
    _, expected_ids = _hf_greedy(neox_dir)
    server = ExampleServer(neox_dir, how, tp, tmp_path)
    workers: list[psutil.Process] = []
    try:
        workers = psutil.Process(server.process.pid).children()
        workers = [w for w in workers if "resource_tracker" not in " ".join(w.cmdline())]
        assert len(workers) == tp - 1
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-neox"]
        reply = client.completions.create(
            model="tiny-neox",
            prompt=PROMPT_IDS,
            max_tokens=NUM_NEW_TOKENS,
            temperature=0,
            logprobs=0,
            extra_body={"ignore_eos": True, "skip_special_tokens": False},
        )
    finally:
        server.stop()
        left = _wait_gone(workers, 10)
        for process in left:
            process.kill()
    assert not left, f"workers outlived the server: {left}"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == NUM_NEW_TOKENS
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(neox_dir)
    assert reply.choices[0].logprobs.tokens == [tokenizer.decode([t]) for t in expected_ids]
    # (the server holds back a trailing incomplete UTF-8 character, decoded here as U+FFFD)
    expected_text = tokenizer.decode(expected_ids, skip_special_tokens=False).rstrip("\ufffd")
    assert reply.choices[0].text == expected_text


class NoForward(torch.nn.Module):
    def __init__(self, config, linear_method, parallel) -> None:
        super().__init__()

    def compute_logits(self, hidden_states, attn_metadata):
        return hidden_states

    def load_weights(self, weights):
        return set()


def test_registering_an_invalid_class_fails_with_the_documented_message():
    message = (
        "cannot register 'NoForwardForCausalLM': <class '.*NoForward'> does not follow the paphos "
        r"model contract: missing forward\(input_ids, positions, kv_caches, attn_metadata\)"
    )
    with pytest.raises(ValueError, match=message):
        ModelRegistry.register_model("NoForwardForCausalLM", NoForward)
    assert not ModelRegistry.is_supported("NoForwardForCausalLM")
    with pytest.raises(ValueError, match="it is not a torch.nn.Module subclass"):
        ModelRegistry.register_model("NotAModule", object)
