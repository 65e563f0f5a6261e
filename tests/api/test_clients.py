"""The real clients a vLLM user points at sluice: openai (chat, completions, responses,
embeddings), anthropic (messages), huggingface_hub (chat and the TGI protocol),
langchain-openai's completions class, and curl for health, version and tokenize."""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from langchain_openai import OpenAI as LangchainOpenAI
from sluice.proxy.snapshot import SamplingPlan, StreamPolicy, StreamTimeouts
from sluice.proxy.stopwords import GuardSpec

from tests.fixtures import ProcessServer, ProxyHarness, SimClient, routed_snapshot

STOP = StreamPolicy(name="no-hash", stop=("###",), guard=GuardSpec(stop=("###",)))
PRESET = SamplingPlan(name="precise", defaults={"temperature": 0.3, "top_p": 0.9, "max_tokens": 24})
SCRIPT = ["Hello", " there", ",", " friend", "###", " secret"]
SIM = {"sim": {"script": SCRIPT, "itl_ms": 1, "ttft_ms": 1}}


@pytest.fixture(scope="module")
def proxy(sim_ignore_stop: ProcessServer) -> Iterator[ProxyHarness]:
    snap = routed_snapshot(sim_ignore_stop.url, {"chat": {"policy": STOP, "preset": PRESET}})
    harness = ProxyHarness(snap)
    yield harness
    harness.close()


@pytest.fixture
def sim_requests(sim_ignore_stop: ProcessServer) -> SimClient:
    client = SimClient(sim_ignore_stop.url)
    client.reset()
    return client


def test_openai_chat_completions_responses_embeddings(proxy: ProxyHarness) -> None:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="none", max_retries=0)
    chat = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], extra_body=SIM
    )
    assert chat.choices[0].message.content == "Hello there, friend"
    completion = client.completions.create(model="chat", prompt="hi", extra_body=SIM)
    assert completion.choices[0].text == "Hello there, friend"
    response = client.responses.create(model="chat", input="hi", extra_body=SIM)
    assert response.output_text == "Hello there, friend"
    with client.responses.stream(model="chat", input="hi", extra_body=SIM) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Hello there, friend"
    assert final.output_text == "Hello there, friend"
    embeddings = client.embeddings.create(model="chat", input=["a", "bb"])
    assert [d.index for d in embeddings.data] == [0, 1]
    assert len(embeddings.data[0].embedding) == 8


QUICK = StreamPolicy(
    name="quick",
    timeouts=StreamTimeouts(first_token=0.4, inter_token=0.4, total=None, response_head=None),
)


GUARDED = StreamPolicy(
    name="quick-guarded", stop=("###",), guard=GuardSpec(stop=("###",)), timeouts=QUICK.timeouts
)


@pytest.mark.parametrize("model", ["quick", "guarded"])  # events counted, or each parsed
@pytest.mark.parametrize(
    ("sim", "code"),
    [
        ({"ttft_ms": 3000, "itl_ms": 1}, "first_token_timeout"),
        ({"ttft_ms": 1, "itl_ms": 3000}, "inter_token_timeout"),
    ],
)
def test_openai_sdk_reads_a_responses_stream_timeout_as_its_error_event(
    sim_ignore_stop: ProcessServer, sim: dict[str, int], code: str, model: str
) -> None:
    """The Responses API's own `error` event, numbered after the events relayed and with
    no `[DONE]` (its streams have none), not a chat completion's error chunk: the SDK
    yields it as a ResponseErrorEvent where it raised on the chat shape."""
    routes = {"quick": {"policy": QUICK}, "guarded": {"policy": GUARDED}}
    harness = ProxyHarness(routed_snapshot(sim_ignore_stop.url, routes))
    try:
        # Closed here, not by the garbage collector: a socket it finds open is a
        # ResourceWarning in whichever test runs then.
        body = {"sim": {"script": ["one", " two", " three"], **sim}}
        with (
            openai.OpenAI(base_url=harness.url + "/v1", api_key="none", max_retries=0) as client,
            client.responses.create(
                model=model, input="hi", stream=True, extra_body=body
            ) as stream,
        ):
            events = list(stream)
    finally:
        harness.close()
    last = events[-1]
    assert isinstance(last, openai.types.responses.ResponseErrorEvent), events
    assert last.code == code and "no token from the backend" in last.message
    numbers = [event.sequence_number for event in events]
    assert numbers == list(range(len(events))), numbers  # the error's follows the others'
    if code == "inter_token_timeout":
        assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["one"]


def test_anthropic_sdk_messages(proxy: ProxyHarness, sim_requests: SimClient) -> None:
    client = anthropic.Anthropic(base_url=proxy.url, api_key="none", max_retries=0)
    message = client.messages.create(
        model="chat", max_tokens=20, messages=[{"role": "user", "content": "hi"}],
        extra_body=SIM,
    )  # fmt: skip
    assert message.content[0].text == "Hello there, friend"  # type: ignore[union-attr]
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "###"
    with client.messages.stream(
        model="chat", max_tokens=20, messages=[{"role": "user", "content": "hi"}],
        extra_body=SIM,
    ) as stream:  # fmt: skip
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello there, friend"
    assert final.stop_reason == "stop_sequence"
    # The preset's temperature went out in the Messages vocabulary.
    assert sim_requests.requests()[-1]["body"]["temperature"] == 0.3


def test_huggingface_hub_text_generation_and_chat(sim_ignore_stop: ProcessServer) -> None:
    """text_generation cannot pass the simulator a script, so the stop string is picked
    from what the simulator generates for this prompt (deterministic by its seed)."""
    plain = httpx.post(
        sim_ignore_stop.url + "/v1/completions",
        json={"prompt": "hi", "max_tokens": 10, "temperature": 0.3},
        timeout=10,
    ).json()["choices"][0]["text"]
    at = len(plain) // 2
    while plain.find(plain[at : at + 3]) != at:
        at += 1
    stop = plain[at : at + 3]
    policy = StreamPolicy(name="mid", stop=(stop,), guard=GuardSpec(stop=(stop,)))
    harness = ProxyHarness(
        routed_snapshot(sim_ignore_stop.url, {"tgi": {"policy": policy, "preset": PRESET}})
    )
    sim = SimClient(sim_ignore_stop.url)
    try:
        client = InferenceClient(base_url=harness.url)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "not served via TGI" would be a warning
            tokens = list(client.text_generation("hi", stream=True, max_new_tokens=10))
            assert "".join(tokens) == plain[:at]
            details = client.text_generation("hi", details=True, max_new_tokens=10)
        assert details.generated_text == plain[:at]
        assert details.details is not None
        assert details.details.finish_reason == "stop_sequence"
        sent = sim.requests()[-1]["body"]
        # TGI names mapped onto vLLM's, the preset's defaults added, the policy's stop sent.
        assert sent["max_tokens"] == 10 and sent["temperature"] == 0.3
        assert sent["top_p"] == 0.9 and sent["stop"] == [stop] and sent["prompt"] == "hi"
        streamed = list(client.text_generation("hi", stream=True, details=True, max_new_tokens=10))
        assert streamed[-1].generated_text == plain[:at]
        assert streamed[-1].details is not None
        chat = InferenceClient(base_url=harness.url + "/v1").chat_completion(
            model="tgi", messages=[{"role": "user", "content": "hi"}], max_tokens=10
        )
        assert chat.choices[0].message.content
    finally:
        harness.close()


def test_tgi_unsupported_parameter_in_tgi_error_shape(proxy: ProxyHarness) -> None:
    from huggingface_hub.errors import ValidationError

    client = InferenceClient(base_url=proxy.url)
    with pytest.raises(ValidationError, match="watermark"):
        client.text_generation("hi", watermark=True)


def test_langchain_openai_completions_class(proxy: ProxyHarness) -> None:
    llm = LangchainOpenAI(
        base_url=proxy.url + "/v1", api_key="none", model="chat", max_retries=0,  # type: ignore[arg-type]
        extra_body=SIM,
    )  # fmt: skip
    assert llm.invoke("hi") == "Hello there, friend"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_health_version_tokenize(proxy: ProxyHarness) -> None:
    def curl(*args: str) -> tuple[int, str]:
        out = subprocess.run(
            ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", *args],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
        body, _, code = out.stdout.rpartition("\n")
        return int(code), body

    assert curl(proxy.url + "/health") == (200, "")
    assert curl(proxy.url + "/ping") == (200, "")
    status, body = curl(proxy.url + "/version")
    assert status == 200 and json.loads(body)["version"] == "0.26.0"
    status, body = curl(
        "-H", "content-type: application/json", "-d", '{"model": "chat", "prompt": "Hello there"}',
        proxy.url + "/tokenize",
    )  # fmt: skip
    assert status == 200
    assert list(json.loads(body)) == ["count", "max_model_len", "tokens", "token_strs"]
