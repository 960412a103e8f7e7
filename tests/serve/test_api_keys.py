"""With --api-keys set, /v1 requests need `Authorization: Bearer KEY` or `x-api-key: KEY`: others
get 401 with an OpenAI error body and reach no engine; /health stays open."""

from __future__ import annotations

from collections.abc import Iterator

import httpx2
import openai
import pytest
from fake_engine import FakeEngine
from server_utils import RunningServer, serve_engine

KEYS = ("sk-first", "sk-second")
BODY = {"prompt": "Hello", "max_tokens": 2}


@pytest.fixture
def keyed_server(fake_engine: FakeEngine) -> Iterator[RunningServer]:
    yield from serve_engine(fake_engine, api_keys=KEYS)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "sk-first"},
        {"x-api-key": "nope"},
        {"Authorization": "Basic c2stZmlyc3Q="},
    ],
    ids=["none", "wrong_bearer", "no_bearer_prefix", "wrong_x_api_key", "basic_auth"],
)
def test_requests_without_a_valid_key_get_401_and_do_no_work(
    keyed_server: RunningServer, fake_engine: FakeEngine, headers: dict[str, str]
) -> None:
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/tokenize"):
        response = httpx2.post(keyed_server.base_url + path, json=BODY, headers=headers)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["type"] == "authentication_error"
    assert httpx2.get(keyed_server.base_url + "/v1/models", headers=headers).status_code == 401
    assert fake_engine.num_prompt_total == 0


def test_valid_bearer_or_x_api_key_is_served_and_health_stays_open(
    keyed_server: RunningServer, fake_engine: FakeEngine
) -> None:
    assert httpx2.get(keyed_server.base_url + "/health").status_code == 200
    by_bearer = httpx2.post(
        keyed_server.base_url + "/v1/completions",
        json=BODY,
        headers={"Authorization": "Bearer sk-second"},
    )
    assert by_bearer.status_code == 200, by_bearer.text
    by_header = httpx2.post(
        keyed_server.base_url + "/v1/completions", json=BODY, headers={"x-api-key": "sk-first"}
    )
    assert by_header.status_code == 200, by_header.text
    client = openai.OpenAI(base_url=keyed_server.api_url, api_key="sk-first", max_retries=0)
    assert client.completions.create(model="fake-model", **BODY).choices[0].text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_server.api_url, api_key="bad", max_retries=0).models.list()
