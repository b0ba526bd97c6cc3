"""The server as 2 processes x 4 CPU devices (``scripts/launch.py``): the same tokens as the
single-process server, followers that stop with the leader, and a leader that fails its
requests and exits when a follower dies."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import jsonschema
import numpy as np
import openai
import psutil
import pytest

from tests.support import REPO

MODEL = REPO / "checkpoints" / "tiny-llama4"
MAX_LEN = 64
ARGS = ["--model", str(MODEL), "--max-model-len", str(MAX_LEN), "--max-num-seqs", "2",
        "--max-num-batched-tokens", "32", "--seed", "0"]
STEP_TIMEOUT = 15
# The one-process reference: synchronous, compiling its programs as requests need them (the
# two-process servers warm up: a compile inside a step could outlast STEP_TIMEOUT).
REFERENCE = ["--no-async-scheduling", "--skip-warmup"]


@pytest.fixture(scope="module")
def args(tmp_path_factory) -> list[str]:
    """The servers' flags; one compilation cache for the module, so later servers load the
    step programs that earlier ones compiled."""
    return [*ARGS, "--compilation-cache-dir", str(tmp_path_factory.mktemp("xla"))]


@contextlib.contextmanager
def launched(pool, args: list[str]):
    """``scripts/launch.py`` running the server as 2 processes x 4 CPU devices until /health
    answers; yields (base URL, the launcher process, a function returning its log's end)."""
    launcher = [sys.executable, str(REPO / "scripts" / "launch.py"), "--num-processes", "2",
                "--cpu-devices-per-process", "4", "--grace", "60", "--", sys.executable, "-m",
                "jaxllm.serve"]
    with pool.private(args, cwd=REPO, command=launcher,
                      reason="two processes of one server, stopped and killed by the test"
                      ) as server:
        yield server.url, server.proc, lambda: server.log_text()[-6000:]


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


LONG = list(range(10, 50))  # 40 tokens: two full pages of 16, shared by a second request


def _prefix_cache_hits(base: str) -> float:
    """Prompt tokens the server served from its prefix cache so far (its metrics)."""
    found = re.search(r"^vllm:prefix_cache_hits_total\{[^}]*\} (\S+)$",
                      httpx.get(f"{base}/metrics").text, re.M)
    assert found, "no prefix-cache metric"
    return float(found.group(1))


def _answers(client: openai.OpenAI) -> dict:
    """Greedy (and seeded) answers that cover streaming, n > 1, penalties, a prefix-cache
    hit, chunked prefill, a request ending exactly at max_model_len and echoed prompt
    scores (the scoring step); tokens, not just text."""
    def completion(**kwargs) -> list:
        r = client.completions.create(model="tiny-llama4", logprobs=1, **kwargs)
        return [(c.logprobs.tokens, c.finish_reason) for c in r.choices]

    out = {
        "greedy": completion(prompt=[5, 41, 42, 83, 7, 9], max_tokens=12, temperature=0),
        "n=2 seeded": completion(prompt=[5, 41, 42], max_tokens=10, temperature=0.9, n=2,
                                 seed=7),
        "bias, min_tokens": completion(prompt=[5, 41, 42], max_tokens=6, temperature=0,
                                       logit_bias={"7": 4}, extra_body={"min_tokens": 4}),
        # The penalty state is split over the vocabulary, so each process holds part of it.
        "penalties": completion(prompt=[5, 41, 42, 5, 41], max_tokens=10, temperature=0,
                                frequency_penalty=1.0, presence_penalty=0.5,
                                extra_body={"repetition_penalty": 1.3}),
        "prefix miss": completion(prompt=LONG, max_tokens=8, temperature=0),
        "prefix hit": completion(prompt=LONG + [3], max_tokens=8, temperature=0),
        "to max_model_len": completion(prompt=list(range(40, 90)), max_tokens=MAX_LEN - 50,
                                       temperature=0, extra_body={"ignore_eos": True}),
    }
    echo = client.completions.create(model="tiny-llama4", prompt=[5, 41, 42, 83, 7],
                                     max_tokens=3, temperature=0, echo=True, logprobs=1)
    out["echo"] = echo.choices[0].logprobs.tokens
    out["echo scores"] = echo.choices[0].logprobs.token_logprobs
    chat = client.chat.completions.create(
        model="tiny-llama4", messages=[{"role": "user", "content": "hello there"}],
        max_tokens=10, temperature=0)
    out["chat"] = [(c.message.content, c.finish_reason) for c in chat.choices]
    # Structured outputs: the token mask travels with the step to every process.
    constrained = client.chat.completions.create(
        model="tiny-llama4", messages=[{"role": "user", "content": "hi"}], max_tokens=30,
        temperature=0.9, seed=3, n=2, response_format={"type": "json_schema", "json_schema": {
            "name": "s", "schema": SCHEMA, "strict": True}})
    out["json schema"] = [(c.message.content, c.finish_reason) for c in constrained.choices]
    stream = client.completions.create(model="tiny-llama4", prompt=[9, 8, 7], max_tokens=12,
                                       temperature=0, stream=True, n=2)
    # Each choice's chunks in the order they came; the choices' interleaving may differ.
    out["stream"] = sorted(((c.index, c.text, c.finish_reason) for chunk in stream
                            for c in chunk.choices), key=lambda chunk: chunk[0])
    return out


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "ok": {"type": "boolean"}}, "required": ["n", "ok"]}
MESHES = {"model=8": ["--tensor-parallel-size", "8"],
          "data=2,model=4": ["--data-parallel-size", "2", "--tensor-parallel-size", "4"]}


@pytest.mark.parametrize("mesh", ["model=8", pytest.param("data=2,model=4",
                                                          marks=pytest.mark.slow)])
def test_two_processes_answer_like_one(server_pool, args, mesh):
    # The reference runs without async scheduling, the two processes with it (the default):
    # the answers are the same either way.
    base = server_pool.shared([*args, *MESHES[mesh], *REFERENCE], cwd=REPO).url
    hits_before = _prefix_cache_hits(base)  # a shared server: count this test's hits only
    expected = _answers(_client(base))
    expected_hits = _prefix_cache_hits(base) - hits_before
    with launched(server_pool, [*args, *MESHES[mesh]]) as (base, launcher, read_log):
        answers = _answers(_client(base))
        assert _prefix_cache_hits(base) == expected_hits >= 32  # two pages of LONG
        launcher.send_signal(signal.SIGTERM)  # the leader stops, then its follower
        assert launcher.wait(timeout=120) == 0, read_log()
    scores, expected_scores = answers.pop("echo scores"), expected.pop("echo scores")
    assert answers == expected
    assert scores[0] is None and expected_scores[0] is None  # the first token has no context
    np.testing.assert_allclose(scores[1:], expected_scores[1:], atol=1e-4)
    assert answers["to max_model_len"][0][1] == "length"
    assert len(answers["to max_model_len"][0][0]) == MAX_LEN - 50
    assert len(answers["n=2 seeded"]) == 2
    for text, finish in answers["json schema"]:
        assert finish == "stop"
        jsonschema.validate(json.loads(text), SCHEMA)


def _child(launcher: subprocess.Popen, process_id: int) -> psutil.Process:
    [child] = [c for c in psutil.Process(launcher.pid).children()
               if c.environ().get("JAXLLM_PROCESS_ID") == str(process_id)]
    return child


@pytest.mark.parametrize("fault", ["killed", pytest.param("hung", marks=pytest.mark.slow)])
def test_a_lost_follower_fails_requests_and_stops_the_leader(server_pool, args, fault):
    """A killed follower breaks the leader's next collective; a hung one (stopped) makes the
    step outlive the step timeout. Either way: 5xx answers, the leader exits non-zero."""
    flags = [*args, *MESHES["model=8"], "--step-timeout", str(STEP_TIMEOUT)]
    with launched(server_pool, flags) as (base, launcher, read_log):
        processes = psutil.Process(launcher.pid).children()
        leader, follower = _child(launcher, 0), _child(launcher, 1)
        plain: dict = {}

        def request_in_flight():
            plain["response"] = httpx.post(f"{base}/v1/completions", timeout=120, json={
                "model": "tiny-llama4", "prompt": [5, 6, 7], "max_tokens": 55,
                "temperature": 0, "ignore_eos": True})

        thread = threading.Thread(target=request_in_flight)
        thread.start()
        events = []
        with httpx.stream("POST", f"{base}/v1/completions", timeout=120, json={
                "model": "tiny-llama4", "prompt": [9, 8, 7], "max_tokens": 55,
                "temperature": 0, "ignore_eos": True, "stream": True}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                events.append(json.loads(line[len("data: "):]))
                if len(events) == 2:
                    lost = time.monotonic()
                    if fault == "killed":
                        follower.kill()
                    else:
                        follower.suspend()
        answered = time.monotonic() - lost
        thread.join(timeout=120)
        leader.wait(timeout=STEP_TIMEOUT + 60)
        if fault == "hung":
            follower.resume()  # lets the launcher's SIGTERM end it
        rc = launcher.wait(timeout=120)
        log = read_log()
    print(f"\n{fault} follower: errors answered {answered:.1f} s later")
    assert answered < STEP_TIMEOUT + 30
    errors = [e["error"] for e in events if "error" in e]
    assert errors and errors[0]["code"] >= 500, events[-3:]
    assert plain["response"].status_code >= 500, plain["response"].text
    assert plain["response"].json()["object"] == "error"
    assert rc != 0, log
    assert not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


SPECULATIVE = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3},
    "eagle3": {"method": "eagle3", "num_speculative_tokens": 3,
               "model": str(REPO / "checkpoints" / "tiny-llama4-eagle3")},
}


def _spec_drafts(base: str) -> float:
    found = re.search(r"^vllm:spec_decode_num_drafts_total\{[^}]*\} (\S+)$",
                      httpx.get(f"{base}/metrics").text, re.M)
    assert found, "no speculative decoding metric"
    return float(found.group(1))


@pytest.mark.slow  # two servers, minutes each
@pytest.mark.parametrize("method", list(SPECULATIVE))
def test_two_processes_speculating_answer_like_one_without(server_pool, args, method):
    """Speculative decoding on 2 processes x 4 devices (model=8): the drafts (n-gram from
    the leader's host, EAGLE-3 from the step's own outputs) reach the follower with the
    step, and the greedy answers equal one process's without speculation; requests with
    penalties or a grammar (which never draft) share steps that verify others' drafts."""
    def answers(client: openai.OpenAI) -> dict:
        out = _answers(client)
        repeated = client.completions.create(  # a pattern n-gram lookup finds
            model="tiny-llama4", prompt=[5, 41, 42, 5, 41, 42, 5, 41], max_tokens=12,
            temperature=0, logprobs=1)
        out["repeated"] = [(c.logprobs.tokens, c.finish_reason) for c in repeated.choices]
        return out

    base = server_pool.shared([*args, *REFERENCE], cwd=REPO).url
    expected = answers(_client(base))
    flags = [*args, *MESHES["model=8"], "--speculative-config", json.dumps(SPECULATIVE[method])]
    with launched(server_pool, flags) as (base, launcher, read_log):
        got = answers(_client(base))
        drafts = _spec_drafts(base)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=120) == 0, read_log()
    assert drafts > 0
    # Seeded sampling keeps its distribution, not its tokens, when drafts are verified.
    for key in ("n=2 seeded", "json schema"):
        got.pop(key), expected.pop(key)
    scores, expected_scores = got.pop("echo scores"), expected.pop("echo scores")
    np.testing.assert_allclose(scores[1:], expected_scores[1:], atol=1e-4)
    assert got == expected
