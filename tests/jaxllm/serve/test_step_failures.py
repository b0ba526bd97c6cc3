"""Failed steps through the server (in process, official openai client): the requests of a
failed step get a 500, the others are served; when the engine cannot recover, /health and
every request answer 503 at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
import openai
import pytest

import jaxllm
from jaxllm.engine import Engine
from jaxllm.engine.faults import Fault, FaultInjector
from jaxllm.serve.app import ServerState, build_app
from jaxllm.serve.async_engine import AsyncEngine
from jaxllm.serve.metrics import Metrics
from jaxllm.serve.tokenizer import TextCodec
from tests.jaxllm.engine.test_engine import _prompts, hf_greedy
from tests.support import hf_models

NUM_PAGES = 64  # room for two sequences of max_model_len in every layer group
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """One warmed-up engine for the module (each test serves it with a new AsyncEngine), a
    word tokenizer, and HF's greedy texts."""
    hf, _, path = tiny_model("scout")
    model = jaxllm.load_model(path, max_model_len=80, page_size=8, max_num_seqs=2)
    engine = Engine(model, num_pages=NUM_PAGES, max_num_batched_tokens=16)
    engine.warmup(progress=False)
    words = tmp_path_factory.mktemp("words")
    hf_models.save_word_tokenizer(words, hf_models.BASE["vocab_size"])
    codec = TextCodec.from_dir(words)
    prompts = _prompts([5, 12, 20, 9, 14], seed=12)
    texts = []
    for p in prompts:
        new = hf_greedy(hf, p, MAX_TOKENS)
        texts.append(codec.decode(new[:-1] if new[-1] == 2 else new))
    return engine, codec, prompts, texts


@contextlib.asynccontextmanager
async def serving(engine: Engine, codec: TextCodec, **kwargs):
    """The app over ``engine`` in process: yields (openai client, httpx client, AsyncEngine)."""
    metrics = Metrics("tiny")
    async_engine = AsyncEngine(engine, metrics, **kwargs)
    app = build_app(ServerState(async_engine, codec, "tiny", metrics))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test") as http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="none",
                                        http_client=http, max_retries=0)
            yield client, http, async_engine
    finally:
        async_engine.shutdown()


async def _complete(client: openai.AsyncOpenAI, prompt: list[int]):
    """The completion's text, or the API error it got (within 30 s: never a hang)."""
    try:
        out = await asyncio.wait_for(client.completions.create(
            model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0), 30)
    except openai.APIStatusError as e:
        return e
    return out.choices[0].text


@pytest.mark.heavy
def test_failed_step_gets_500_and_the_rest_are_served(setup, caplog):
    engine, codec, prompts, texts = setup
    caplog.set_level(logging.WARNING)

    async def main():
        async with serving(engine, codec) as (client, http, _):
            with FaultInjector(engine.runner, Fault.AFTER_DISPATCH, steps={2}):
                got = await asyncio.gather(*(_complete(client, p) for p in prompts[:4]))
            later = await _complete(client, prompts[4])
            health = await http.get("/health")
            metrics = (await http.get("/metrics")).text
        return got, later, health, metrics

    got, later, health, metrics = asyncio.run(main())
    failed = [i for i, g in enumerate(got) if not isinstance(g, str)]
    assert 1 <= len(failed) <= 2  # two slots: the step held one or two requests
    for i in failed:
        assert got[i].status_code == 500
        body = got[i].response.json()
        assert body["object"] == "error" and body["type"] == "InternalServerError"
        assert "engine step failed (InjectedFault: injected after-dispatch failure at step 2)" \
            in body["message"]
    assert [g for i, g in enumerate(got) if i not in failed] == \
        [t for i, t in enumerate(texts[:4]) if i not in failed]
    assert later == texts[4]
    assert health.status_code == 200
    assert 'jaxllm:engine_step_failures_total{model_name="tiny"} 1.0' in metrics
    assert engine.pages.num_free == NUM_PAGES
    assert "recovered: KV cache re-created" in caplog.text


def test_failed_recovery_makes_health_and_requests_503(setup):
    engine, codec, prompts, _ = setup

    async def main():
        async with serving(engine, codec) as (client, http, _):
            with FaultInjector(engine.runner, Fault.BEFORE_DISPATCH, steps={2},
                               fail_recovery=True):
                got = await asyncio.gather(*(_complete(client, p) for p in prompts[:3]))
            health = await http.get("/health")
            later = await _complete(client, prompts[4])
            streamed = await http.post("/v1/completions", json={
                "model": "tiny", "prompt": prompts[4], "max_tokens": 2, "stream": True})
        return got, health, later, streamed

    try:
        got, health, later, streamed = asyncio.run(main())
    finally:  # the engine thread has ended: put the shared engine right for the next test
        for rid in list(engine.requests):
            engine.abort(rid)
        engine.recover()
    for error in got + [later]:
        assert isinstance(error, openai.APIStatusError) and error.status_code == 503
        assert "cannot re-create the KV cache" in error.response.json()["message"]
    assert health.status_code == 503 and "cannot re-create the KV cache" in health.text
    assert streamed.status_code == 503


def test_repeated_failures_make_health_503(setup):
    engine, codec, prompts, _ = setup

    async def main():
        async with serving(engine, codec, max_consecutive_failures=2) as (client, http, _):
            with FaultInjector(engine.runner, Fault.BEFORE_DISPATCH, steps=range(1, 100)):
                first = await _complete(client, prompts[0])
                healthy_after_one = (await http.get("/health")).status_code
                second = await _complete(client, prompts[1])
                health = await http.get("/health")
                third = await _complete(client, prompts[2])
        return first, healthy_after_one, second, health, third

    first, healthy_after_one, second, health, third = asyncio.run(main())
    assert first.status_code == second.status_code == 500 and healthy_after_one == 200
    assert health.status_code == 503 and "2 engine steps failed in a row" in health.text
    assert third.status_code == 503
    assert engine.pages.num_free == NUM_PAGES and not engine.requests
