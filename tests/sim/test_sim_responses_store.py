"""The simulator's stored responses, as vLLM 0.26 keeps them with
VLLM_ENABLE_RESPONSES_API_STORE=1: in the server's memory, read by `GET /v1/responses/{id}`,
refused by `.../cancel` (not a background response), named by `previous_response_id`.
Through the openai SDK, as an app would."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest


@pytest.fixture
def store_sim(make_sim):
    return make_sim(responses_store=True)


@pytest.fixture
def client(store_sim) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{store_sim.url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def test_a_response_is_kept_and_read_back(client: openai.OpenAI) -> None:
    made = client.responses.create(model="tiny-llama", input="Hello", max_output_tokens=5)
    assert made.id.startswith("resp_")
    read = client.responses.retrieve(made.id)
    assert read.id == made.id and read.status == made.status
    assert read.output_text == made.output_text and read.output_text

    events = list(
        client.responses.create(model="tiny-llama", input="Hi", max_output_tokens=4, stream=True)
    )
    final = events[-1].response  # response.incomplete: its 4 tokens ran out
    assert events[-1].type == "response.incomplete" and final.output_text
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_unknown_and_invalid_ids_get_vllms_errors(client: openai.OpenAI, store_sim) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.retrieve("resp_0123")
    body = missing.value.response.json()["error"]
    assert body["message"] == "Response with id 'resp_0123' not found."
    assert body["param"] == "response_id" and body["code"] == 404
    with pytest.raises(openai.BadRequestError) as invalid:
        client.responses.retrieve("msg_0123")
    assert "Expected an ID that begins with 'resp'" in invalid.value.message
    # As FastAPI matches the routes: one path segment for the id; a method per route.
    assert httpx.get(store_sim.url + "/v1/responses/a/b", timeout=5).status_code == 404
    wrong = httpx.post(store_sim.url + "/v1/responses/resp_1", timeout=5)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET"


def test_cancel_refuses_a_finished_response(client: openai.OpenAI) -> None:
    made = client.responses.create(model="tiny-llama", input="Hello", max_output_tokens=3)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.cancel(made.id)
    assert "Cannot cancel a synchronous response." in refused.value.message
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_unknown")


def test_previous_response_id_must_be_held_here(client: openai.OpenAI, store_sim) -> None:
    made = client.responses.create(model="tiny-llama", input="Hello", max_output_tokens=3)
    follow = client.responses.create(
        model="tiny-llama", input="And?", max_output_tokens=3, previous_response_id=made.id
    )
    assert follow.previous_response_id == made.id
    tokens = store_sim.server.stats.tokens
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(
            model="tiny-llama", input="And?", max_output_tokens=3, previous_response_id="resp_9"
        )
    assert missing.value.response.json()["error"]["message"] == (
        "Response with id 'resp_9' not found."
    )
    assert store_sim.server.stats.tokens == tokens  # refused before generating


def test_store_false_and_a_server_without_the_store_keep_nothing(make_sim) -> None:
    for sim, store in ((make_sim(responses_store=True), False), (make_sim(), True)):
        with openai.OpenAI(base_url=f"{sim.url}/v1", api_key="x", max_retries=0) as sdk:
            made = sdk.responses.create(
                model="tiny-llama", input="Hello", max_output_tokens=3, store=store
            )
            with pytest.raises(openai.NotFoundError):
                sdk.responses.retrieve(made.id)
