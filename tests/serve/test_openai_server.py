"""The real `paphos run` server over a tiny random Llama, driven by the official `openai` client:
completions and chat, streamed and not (same text), n, stop strings, logprobs, echo, usage, token-id
prompts, tokenize/detokenize, health, version and metrics."""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import pytest
from server_utils import ServerProcess

MODEL = "tiny"
PROMPT = "The quick brown fox"
FULL = {"ignore_eos": True}  # a random model may emit EOS at once; tests want all max_tokens


@pytest.fixture(scope="module")
def client(tiny_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key="none", max_retries=0)


def complete(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("extra_body", FULL)
    return client.completions.create(model=MODEL, **kwargs)


def test_models_lists_the_served_model_name(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7}])
def test_streamed_completion_text_equals_the_non_streamed_text(
    client: openai.OpenAI, sampling: dict[str, Any]
) -> None:
    whole = complete(client, prompt=PROMPT, max_tokens=12, **sampling)
    chunks = list(complete(client, prompt=PROMPT, max_tokens=12, stream=True, **sampling))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert whole.choices[0].finish_reason == "length"
    assert streamed == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert whole.usage.completion_tokens == 12


def test_streamed_chat_sends_role_then_content_equal_to_the_non_streamed_reply(
    client: openai.OpenAI,
) -> None:
    messages = [{"role": "user", "content": "Hello there"}]
    kwargs = {"model": MODEL, "messages": messages, "max_tokens": 10, "temperature": 0}
    whole = client.chat.completions.create(**kwargs, extra_body=FULL)
    chunks = list(client.chat.completions.create(**kwargs, extra_body=FULL, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.role == "assistant"
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n2_returns_two_choices_with_their_own_indices(client: openai.OpenAI) -> None:
    out = complete(client, prompt=PROMPT, max_tokens=6, n=2, temperature=1.0, seed=3)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == 12
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        n=2,
        max_tokens=4,
        seed=1,
        extra_body=FULL,
    )
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI) -> None:
    text = complete(client, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    windows = [text[k : k + 2] for k in range(len(text) // 2, len(text) - 1)]
    usable = [w for w in windows if w.isascii() and w.isalnum()]
    assert usable, f"the greedy text {text!r} gives no usable stop string"
    stop = usable[0]
    expected = text[: text.index(stop)]
    out = complete(client, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "stop"
    chunks = complete(client, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected


def test_completion_logprobs_list_the_sampled_and_top_tokens(client: openai.OpenAI) -> None:
    out = complete(client, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    for sampled, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3 and sampled <= 0  # byte tokens may share the text "\ufffd"
        assert sampled == pytest.approx(max(top.values()), abs=1e-4)  # greedy takes the best


def test_chat_logprobs_give_top_logprobs_per_token(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body=FULL,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-4) for t in content)


def test_usage_counts_prompt_tokens_and_streams_it_last(
    client: openai.OpenAI, tiny_server: ServerProcess
) -> None:
    count = httpx2.post(tiny_server.base_url + "/v1/tokenize", json={"prompt": PROMPT}).json()
    whole = complete(client, prompt=PROMPT, max_tokens=7, temperature=0)
    assert whole.usage.prompt_tokens == count["count"]
    assert whole.usage.total_tokens == count["count"] + 7
    chunks = list(
        complete(
            client,
            prompt=PROMPT,
            max_tokens=7,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_echo_and_token_id_prompts(client: openai.OpenAI, tiny_server: ServerProcess) -> None:
    ids = httpx2.post(tiny_server.base_url + "/v1/tokenize", json={"prompt": PROMPT}).json()
    by_text = complete(client, prompt=PROMPT, max_tokens=5, temperature=0)
    by_ids = complete(client, prompt=ids["tokens"], max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    echoed = complete(client, prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + by_text.choices[0].text
    with_logprobs = (
        complete(client, prompt=PROMPT, max_tokens=5, temperature=0, echo=True, logprobs=1)
        .choices[0]
        .logprobs
    )
    assert len(with_logprobs.tokens) == len(ids["tokens"]) + 5
    assert with_logprobs.token_logprobs[0] is None  # the first prompt token has no logprob
    assert all(lp is not None for lp in with_logprobs.token_logprobs[1:])
    several = complete(client, prompt=[PROMPT, "Hello"], max_tokens=3, temperature=0, n=2)
    assert sorted(c.index for c in several.choices) == [0, 1, 2, 3]


def test_tokenize_and_detokenize_round_trip(tiny_server: ServerProcess) -> None:
    url = tiny_server.base_url + "/v1"
    tokens = httpx2.post(url + "/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert httpx2.post(url + "/detokenize", json={"tokens": tokens}).json() == {
        "prompt": "Hello world"
    }
    chat = httpx2.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "x"}]})
    text = httpx2.post(url + "/detokenize", json={"tokens": chat.json()["tokens"]}).json()
    assert text["prompt"] == "<|user|>x\n<|assistant|>"


def test_health_version_and_metrics(client: openai.OpenAI, tiny_server: ServerProcess) -> None:
    complete(client, prompt=PROMPT, max_tokens=3)
    assert httpx2.get(tiny_server.base_url + "/health").status_code == 200
    assert httpx2.get(tiny_server.base_url + "/version").json()["version"]
    body = httpx2.get(tiny_server.base_url + "/metrics").text
    for name in (
        "paphos:num_requests_running",
        "paphos:num_requests_waiting",
        "paphos:kv_cache_usage_perc",
        "paphos:prompt_tokens_total",
        "paphos:generation_tokens_total",
        "paphos:time_to_first_token_seconds_bucket",
        "paphos:time_per_output_token_seconds_bucket",
        "paphos:e2e_request_latency_seconds_bucket",
        "paphos:prefix_cache_hit_rate",
    ):
        assert name in body, name
    assert metric(body, "paphos:generation_tokens_total") >= 3
    assert metric(body, "paphos:e2e_request_latency_seconds_count") >= 1


def metric(body: str, name: str) -> float:
    """The value of the first sample called `name` in a Prometheus text body."""
    for line in body.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the metrics")


def test_startup_log_names_the_model_kv_cache_and_url_once(tiny_server: ServerProcess) -> None:
    with open(tiny_server.log_path) as f:
        log = f.read()
    assert log.count("KV cache:") == 1 and "sequences of max_model_len fit at once" in log
    assert log.count("INFO paphos.runner.model_runner: model ") == 1
    assert log.count(f"serving tiny on http://127.0.0.1:{tiny_server.port}/v1") == 1
    assert "resolved engine config" not in log  # debug level only
