"""Token ids in responses, on the real server over the tiny Llama with the `openai` client:
`return_token_ids` (prompt and choice ids, completions and chat, streamed and not),
`return_tokens_as_token_ids` (logprob tokens as "token_id:N", per request or the server's
--return-tokens-as-token-ids), and `prompt_logprobs` on /v1/completions."""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import pytest
from server_utils import ServerProcess, serve_engine

MODEL = "tiny"
PROMPT = "The quick brown fox"
FULL = {"ignore_eos": True}


@pytest.fixture(scope="module")
def client(tiny_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key="none", max_retries=0)


def _extra(choice: Any, name: str) -> Any:
    return (choice.model_extra or {}).get(name)


def test_completion_returns_prompt_and_output_token_ids_when_asked(
    client: openai.OpenAI, tiny_tokenizer: Any
) -> None:
    kwargs = {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    whole = client.completions.create(**kwargs, extra_body={**FULL, "return_token_ids": True})
    choice = whole.choices[0]
    assert _extra(choice, "prompt_token_ids") == tiny_tokenizer(PROMPT).input_ids
    ids = _extra(choice, "token_ids")
    assert len(ids) == whole.usage.completion_tokens == 6
    assert tiny_tokenizer.decode(ids) == choice.text
    chunks = client.completions.create(
        **kwargs, stream=True, extra_body={**FULL, "return_token_ids": True}
    )
    streamed = [_extra(c.choices[0], "token_ids") for c in chunks if c.choices]
    assert [t for piece in streamed for t in piece] == ids
    plain = client.completions.create(**kwargs, extra_body=FULL).choices[0]
    assert "token_ids" not in (plain.model_extra or {})  # only when asked


def test_logprob_tokens_as_token_ids_per_request(client: openai.OpenAI) -> None:
    body = {**FULL, "return_token_ids": True, "return_tokens_as_token_ids": True}
    choice = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, logprobs=2, temperature=0, extra_body=body
    ).choices[0]
    assert choice.logprobs.tokens == [f"token_id:{t}" for t in _extra(choice, "token_ids")]
    assert all(k.startswith("token_id:") for top in choice.logprobs.top_logprobs for k in top)
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        logprobs=True,
        temperature=0,
        extra_body=body,
    )
    ids = _extra(chat.choices[0], "token_ids")
    assert [e.token for e in chat.choices[0].logprobs.content] == [f"token_id:{t}" for t in ids]
    assert _extra(chat, "prompt_token_ids")  # the rendered conversation's ids


def test_chat_streams_token_ids_and_the_prompt_ids_once(client: openai.OpenAI) -> None:
    kwargs = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 5,
        "temperature": 0,
        "extra_body": {**FULL, "return_token_ids": True},
    }
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [t for c in chunks for ch in c.choices for t in (_extra(ch, "token_ids") or [])]
    assert streamed == _extra(whole.choices[0], "token_ids") and len(streamed) == 5
    prompts = [_extra(c, "prompt_token_ids") for c in chunks if _extra(c, "prompt_token_ids")]
    assert prompts == [_extra(whole, "prompt_token_ids")]


def test_prompt_logprobs_on_completions_match_echoed_logprobs(
    client: openai.OpenAI, tiny_tokenizer: Any
) -> None:
    prompt_ids = tiny_tokenizer(PROMPT).input_ids
    choice = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=1, extra_body={**FULL, "prompt_logprobs": 2}
    ).choices[0]
    found = _extra(choice, "prompt_logprobs")
    assert len(found) == len(prompt_ids) and found[0] is None
    echoed = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=1, echo=True, logprobs=2, extra_body=FULL
    ).choices[0]
    for position, token_id, want in zip(
        found[1:], prompt_ids[1:], echoed.logprobs.token_logprobs[1:], strict=False
    ):
        assert str(token_id) in position  # the prompt's own token, besides the top 2
        assert position[str(token_id)]["logprob"] == pytest.approx(want, abs=1e-5)
        assert len(position) <= 3


def test_server_flag_makes_token_ids_the_default(fake_engine: Any) -> None:
    for server in serve_engine(fake_engine, return_tokens_as_token_ids=True):
        url = server.api_url + "/completions"
        body = {"prompt": "ab", "max_tokens": 3, "logprobs": 1}
        tokens = httpx2.post(url, json=body).json()["choices"][0]["logprobs"]["tokens"]
        assert tokens and all(t.startswith("token_id:") for t in tokens)
        body["return_tokens_as_token_ids"] = False
        tokens = httpx2.post(url, json=body).json()["choices"][0]["logprobs"]["tokens"]
        assert not any(t.startswith("token_id:") for t in tokens)
