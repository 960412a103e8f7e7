"""`paphos run` with no model serves the packaged SmolLM2-135M-Instruct (GGUF): its chat template
answers a chat request, and the streamed reply equals the non-streamed one (greedy)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from server_utils import ServerProcess

from paphos.config import default_model_path


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    try:
        default_model_path()
    except ValueError as e:
        pytest.skip(f"the default model is not installed: {e}")
    log: Path = tmp_path_factory.mktemp("smollm2") / "server.log"
    args = ["--kv-cache-space", "0.05", "--max-model-len", "512", "--uvicorn-log-level", "warning"]
    server = ServerProcess(args, str(log), startup_timeout=240)
    try:
        yield server
    finally:
        server.stop()


def test_default_model_answers_chat_streamed_and_not(smollm2_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=smollm2_server.base_url + "/v1", api_key="x", max_retries=0)
    model = client.models.list().data[0].id
    assert model == "SmolLM2-135M-Instruct"
    kwargs = {
        "model": model,
        "max_tokens": 12,
        "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }
    reply = client.chat.completions.create(**kwargs)
    text = reply.choices[0].message.content
    assert text and reply.usage.prompt_tokens > 10
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**kwargs, stream=True)
        if c.choices
    )
    assert streamed == text
    assert "Paris" in text


@pytest.fixture(scope="module")
def multi_step_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log: Path = tmp_path_factory.mktemp("smollm2_multi") / "server.log"
    args = ["--kv-cache-space", "0.05", "--max-model-len", "512", "--num-scheduler-steps", "4"]
    server = ServerProcess([*args, "--uvicorn-log-level", "warning"], str(log), startup_timeout=240)
    try:
        yield server
    finally:
        server.stop()


def test_a_multi_step_server_streams_the_single_step_replies_and_stops_inside_a_run(
    smollm2_server: ServerProcess, multi_step_server: ServerProcess
) -> None:
    def replies(server: ServerProcess, **extra: object) -> tuple[str, str, str | None]:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        kwargs = {
            "model": "SmolLM2-135M-Instruct",
            "max_tokens": 30,
            "temperature": 0,
            # Its own system prompt: no block of this prompt is cached from other tests' requests,
            # so both servers compute it from the same cache history (a bf16 prefill over a
            # cached prefix rounds differently from a whole one and may change greedy tokens).
            "messages": [
                {"role": "system", "content": "You answer questions about colours."},
                {"role": "user", "content": "Name three colors of the rainbow."},
            ],
            **extra,
        }
        reply = client.chat.completions.create(**kwargs)
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(**kwargs, stream=True)
            if c.choices
        )
        return reply.choices[0].message.content, streamed, reply.choices[0].finish_reason

    free = replies(smollm2_server)
    assert replies(multi_step_server) == free
    stop = free[0].split()[2]  # a few tokens in: inside a run of four
    stopped = replies(multi_step_server, stop=[stop])
    assert stopped == replies(smollm2_server, stop=[stop])
    assert stopped[2] == "stop" and len(stopped[0]) < len(free[0])
