"""The HTTP layer's guards, in process over a fake engine: errors keep the connection (the
app never re-raises), 405 keeps Allow, body limit, invalid Unicode, validation messages,
tokenization off the event loop, and a non-streaming request aborted when its client leaves."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxllm.engine.request import Request
from jaxllm.serve.app import ServerState, build_app
from jaxllm.serve.async_engine import AsyncEngine
from jaxllm.serve.metrics import Metrics
from tests.jaxllm.serve.fakes import ByteCodec
from tests.jaxllm.serve.test_async_engine import FakeEngine

LIMIT = 4096


class ServingEngine(FakeEngine):
    """FakeEngine with what the HTTP layer reads: ``prepare``, the policy and the vocabulary.
    ``explode`` makes ``prepare`` fail as a bug would."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.policy = SimpleNamespace(max_model_len=64)
        self.model = SimpleNamespace(config=SimpleNamespace(vocab_size=256))
        self.explode = False

    def prepare(self, prompt, sampling, request_id, *, ignore_eos=False, images=()) -> Request:
        if self.explode:
            raise RuntimeError("a bug")
        return Request(request_id, list(prompt), dataclasses.replace(
            sampling, max_tokens=sampling.max_tokens or 4, seed=0))


class TextCodec(ByteCodec):
    """Bytes as tokens; records the threads it tokenizes on."""

    def __init__(self):
        self.threads: list[threading.Thread] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.current_thread())
        return list(text.encode())

    template_has_tools = False

    def render_chat(self, messages, add_generation_prompt: bool = True, tools=None) -> str:
        return "".join(m.get("content", "") for m in messages)


@pytest.fixture
def served():
    engine, codec = ServingEngine(), TextCodec()
    metrics = Metrics("tiny")
    async_engine = AsyncEngine(engine)
    app = build_app(ServerState(async_engine, codec, "tiny", metrics,
                                max_request_bytes=LIMIT))
    yield app, engine, codec, metrics
    async_engine.shutdown()


def _call(app, method: str, path: str, **kwargs) -> httpx.Response:
    """One request in process; the transport raises if the app re-raises an error (which
    would make a real server close the keep-alive connection)."""

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["object"] == "error" and body["code"] == status
    return body["message"]


def test_a_completion_is_served(served):
    app, *_ = served
    r = _call(app, "POST", "/v1/completions", json={"prompt": "ab", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_an_internal_error_is_a_json_500_and_is_not_re_raised(served):
    app, engine, *_ = served
    engine.explode = True
    message = _error(_call(app, "POST", "/v1/completions", json={"prompt": "ab"}), 500)
    assert message == "internal error: RuntimeError: a bug"
    engine.explode = False
    assert _call(app, "GET", "/health").status_code == 200


def test_405_keeps_the_allow_header(served):
    app, *_ = served
    r = _call(app, "GET", "/v1/completions")
    assert _error(r, 405) == "method GET is not allowed on /v1/completions (allowed: POST)"
    assert r.headers["allow"] == "POST"


def test_openapi_documents_the_400_and_the_response_bodies(served):
    app, *_ = served
    schema = _call(app, "GET", "/openapi.json").json()
    completions = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert sorted(completions) == ["200", "400", "401", "404", "413", "500", "503"]
    assert set(completions["200"]["content"]) == {"application/json", "text/event-stream"}
    assert completions["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"}
    assert not any("422" in op["responses"] for ops in schema["paths"].values()
                   for op in ops.values())
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


def test_a_body_over_the_limit_is_a_413_by_length_or_while_streaming_it(served):
    app, *_ = served
    body = json.dumps({"prompt": "w" * LIMIT}).encode()
    message = _error(_call(app, "POST", "/v1/completions", content=body,
                           headers={"content-type": "application/json"}), 413)
    assert f"limit of {LIMIT} bytes" in message and str(len(body)) in message

    async def chunks():  # no Content-Length: counted as it arrives
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    message = _error(_call(app, "POST", "/v1/completions", content=chunks(),
                           headers={"content-type": "application/json"}), 413)
    assert f"limit of {LIMIT} bytes" in message
    assert _call(app, "POST", "/tokenize", json={"prompt": "ok"}).status_code == 200


@pytest.mark.parametrize("path, body, needle", [
    ("/v1/completions", '{"prompt": "a\\ud800b"}', "prompt is not valid Unicode"),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"]}', "prompt.1 is not valid Unicode"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x\\ud800"}]}',
     "messages.0.content is not valid Unicode"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt is not valid Unicode"),
])
def test_invalid_unicode_is_a_400(served, path, body, needle):
    app, *_ = served
    r = _call(app, "POST", path, content=body, headers={"content-type": "application/json"})
    assert needle in _error(r, 400)


@pytest.mark.parametrize("body, needles", [
    ({"prompt": "a", "top_k": 2**31}, ["top_k", "2147483647", "got 2147483648"]),
    ({"prompt": "a", "seed": 2**63}, ["seed", "9223372036854775808"]),
    ({"prompt": "a", "presence_penalty": 2.5}, ["presence_penalty", "less than or equal to 2",
                                                "got 2.5"]),
    ({"prompt": "a", "repetition_penalty": 0}, ["repetition_penalty", "greater than 0",
                                                "got 0"]),
    ({"prompt": "a", "best_of": 3}, ["best_of=3, n=1"]),
    ({"prompt": "a", "stream_options": {"bogus": True}}, ["stream_options.bogus"]),
])
def test_validation_errors_name_the_field_the_limit_and_the_value(served, body, needles):
    app, *_ = served
    message = _error(_call(app, "POST", "/v1/completions", json=body), 400)
    for needle in needles:
        assert needle in message


def test_chat_content_part_that_is_not_text_is_a_400(served):
    app, *_ = served
    for part, needle in [({"type": "text", "text": 5}, "messages.0.content.parts.0.text"),
                         ({"type": "image_url", "image_url": {"url": "x"}},
                          "this model takes no images")]:
        r = _call(app, "POST", "/v1/chat/completions",
                  json={"messages": [{"role": "user", "content": [part]}]})
        assert needle in _error(r, 400)


def test_tokenization_runs_off_the_event_loop(served):
    app, _, codec, _ = served
    assert _call(app, "POST", "/tokenize", json={"prompt": "ab"}).json()["tokens"] == [97, 98]
    r = _call(app, "POST", "/v1/chat/completions",
              json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200
    assert len(codec.threads) == 2
    assert all(t is not threading.main_thread() for t in codec.threads)


def test_a_non_streaming_request_is_aborted_when_its_client_disconnects():
    engine, codec = ServingEngine(gated=True), TextCodec()  # steps wait for a permit
    metrics = Metrics("tiny")
    async_engine = AsyncEngine(engine)
    app = build_app(ServerState(async_engine, codec, "tiny", metrics))
    body = json.dumps({"prompt": "ab", "max_tokens": 50}).encode()
    sent: list[dict] = []

    async def go():
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        hangup = asyncio.get_running_loop().time() + 0.3  # while its tokens are generated

        async def receive():  # as a server's: waits for the client's next message
            if messages:
                return messages.pop()
            if (wait := hangup - asyncio.get_running_loop().time()) > 0:
                await asyncio.sleep(wait)
            return {"type": "http.disconnect"}  # at once, once gone

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions",
                 "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("t", 80)}
        await asyncio.wait_for(app(scope, receive, send), 10)

    try:
        engine.gate.release()  # one step: the request runs, then waits for more permits
        asyncio.run(go())
        engine.gate.release()  # the step under way ends, then the abort is handled
        assert engine.abort_seen.wait(5)
        assert len(engine.aborted) == 1 and not engine.requests
    finally:
        async_engine.shutdown()
    assert sent[0]["status"] == 499
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    [sample] = [s for s in families["vllm:request_success"].samples
                if s.name.endswith("_total")]
    assert sample.labels["finished_reason"] == "abort" and sample.value == 1
