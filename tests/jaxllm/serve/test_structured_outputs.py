"""Structured outputs through the server and the official openai client, on the bundled
model: every output parses and validates (jsonschema), whatever the model's skill."""

from __future__ import annotations

import concurrent.futures
import json
import re

import httpx
import jsonschema
import pytest

from tests.jaxllm.serve.schemas import fifty_schemas
from tests.support import REPO

MODEL = "tiny-llama4"
ASK = [{"role": "user", "content": "Give data"}]


@pytest.fixture
def server(bundled_server):
    """The README's server (every sampled request here brings its seed)."""
    return bundled_server.url, bundled_server.client()


def test_fifty_schemas_validate(server):
    _, client = server
    schemas = fifty_schemas()
    assert len(schemas) == 50 and len({json.dumps(s) for s in schemas}) == 50

    def ask(k):
        return client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=200, seed=k,
            temperature=0 if k % 2 == 0 else 0.8,  # greedy and sampled
            response_format={"type": "json_schema", "json_schema": {
                "name": f"s{k}", "schema": schemas[k], "strict": True}}).choices[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(50)))
    for schema, answer in zip(schemas, answers, strict=True):
        assert answer.finish_reason == "stop", answer.message.content
        jsonschema.validate(json.loads(answer.message.content), schema)
    # Not one constant answer: the model's own choices inside the grammar.
    assert len({a.message.content for a in answers}) > 40


def test_json_object(server):
    """Any JSON object: a key is an unbounded string, which this weak model sometimes never
    closes (it then runs to max_tokens); every answer that ends is an object."""
    _, client = server
    answers = [client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=120, temperature=1.0, seed=seed,
        response_format={"type": "json_object"}).choices[0] for seed in range(8)]
    ended = [a.message.content for a in answers if a.finish_reason == "stop"]
    assert len(ended) >= 3, [a.message.content for a in answers]
    assert all(isinstance(json.loads(text), dict) for text in ended)
    assert all(a.message.content.startswith("{") for a in answers)


def test_strict_schema_takes_no_other_properties(server):
    _, client = server
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}}
    for seed in range(3):
        text = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=100, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {
                "name": "x", "schema": schema, "strict": True}}).choices[0].message.content
        assert set(json.loads(text)) <= {"a"}, text


def test_vllm_structured_outputs_and_guided_fields(server):
    _, client = server
    cases = [
        ({"structured_outputs": {"regex": r"[0-9]{2}-[a-z]{3}"}},
         lambda t: re.fullmatch(r"[0-9]{2}-[a-z]{3}", t)),
        ({"structured_outputs": {"choice": ["left", "right"]}}, lambda t: t in ("left", "right")),
        ({"structured_outputs": {"grammar": 'start: "x=" /[0-9]{1,2}/'}},
         lambda t: re.fullmatch(r"x=[0-9]{1,2}", t)),
        ({"structured_outputs": {"json": {"type": "integer", "minimum": 5, "maximum": 7}}},
         lambda t: int(t) in (5, 6, 7)),
        ({"structured_outputs": {"grammar": 'root ::= "ab" [0-9]'}},  # GBNF
         lambda t: re.fullmatch(r"ab[0-9]", t)),
        ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
        ({"guided_regex": "[A-Z]{4}"}, lambda t: re.fullmatch("[A-Z]{4}", t)),
        ({"guided_json": {"type": "array", "items": {"type": "null"}, "maxItems": 2}},
         lambda t: json.loads(t) in ([], [None], [None, None])),
    ]
    for extra, check in cases:
        for temperature in (0.0, 1.0):
            answer = client.chat.completions.create(
                model=MODEL, messages=ASK, max_tokens=60, temperature=temperature, seed=3,
                extra_body=extra).choices[0]
            assert answer.finish_reason == "stop" and check(answer.message.content), (
                extra, answer.message.content)


def test_completions_endpoint_and_streaming(server):
    _, client = server
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 99}}, "required": ["n"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    out = client.completions.create(model=MODEL, prompt="<|user|>hi<|assistant|>",
                                    max_tokens=40, temperature=0,
                                    extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(out.choices[0].text), schema)
    chunks = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40,
                                            temperature=0, response_format=fmt, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("body,message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "needs json_schema.schema"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"},
     "at most one structured-output constraint"),
    ({"structured_outputs": {"regex": "(("}}, "invalid regex constraint"),
    ({"structured_outputs": {"json": {"type": "nonsense"}}}, "invalid json constraint"),
    ({"structured_outputs": {"choice": []}}, "at least one option"),
    ({"structured_outputs": {"whitespace_pattern": " *"}}, "whitespace_pattern"),
    ({"response_format": {"type": "yaml"}}, "yaml"),
    ({"guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
])
def test_bad_constraints_are_400s(server, body, message):
    base, _ = server
    r = httpx.post(f"{base}/v1/chat/completions", json={
        "model": MODEL, "messages": ASK, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    assert message in r.json()["message"]
    assert httpx.get(f"{base}/health").status_code == 200


def test_skip_special_tokens(server):
    """A special token forced by logit_bias: its text is left out unless
    skip_special_tokens=false."""
    _, client = server

    def text(skip: bool) -> str:
        return client.completions.create(
            model=MODEL, prompt="<|user|>hi<|assistant|>", max_tokens=2, temperature=0,
            logit_bias={"4": 100}, extra_body={"skip_special_tokens": skip}).choices[0].text

    assert text(True) == "" and text(False) == "<|system|><|system|>"


@pytest.mark.slow  # a server of its own flags: a minute or two
@pytest.mark.parametrize("method", ["ngram", "eagle3"])
def test_schemas_validate_beside_speculating_requests(server_pool, method):
    """With ``--speculative-config``, requests with a schema (drafting too, their drafts cut
    and masked by their grammars) share verifying steps with sum questions that draft (the
    bundled EAGLE-3 head, or n-gram lookups): every output still validates, every sum is
    right, and drafts were verified."""
    spec = {"method": method, "num_speculative_tokens": 3}
    if method == "ngram":  # single-token lookups: a sum's digits recur in its question
        spec.update(prompt_lookup_min=1, prompt_lookup_max=3)
    else:
        spec["model"] = str(REPO / "checkpoints" / "tiny-llama4-eagle3")
    schemas = fifty_schemas()[:12]
    sums = [(11, 11), (22, 33), (45, 45), (70, 7), (99, 1), (12, 21)]
    server = server_pool.shared(["--seed", "0", "--speculative-config", json.dumps(spec)],
                                cwd=REPO)
    base, client = server.url, server.client()

    def constrained(k):
        return client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=200, seed=k,
            temperature=0 if k % 2 == 0 else 0.8,
            response_format={"type": "json_schema", "json_schema": {
                "name": f"s{k}", "schema": schemas[k], "strict": True}}).choices[0]

    def add(pair):
        a, b = pair
        return client.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=8,
            messages=[{"role": "user", "content": f"What is {a} + {b}?"}]).choices[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = pool.map(constrained, range(len(schemas)))
        added = pool.map(add, sums)
        answers, added = list(answers), list(added)
    drafts = re.search(r"^vllm:spec_decode_num_drafts_total\{[^}]*\} (\S+)$",
                       httpx.get(f"{base}/metrics").text, re.M)
    for schema, answer in zip(schemas, answers, strict=True):
        assert answer.finish_reason == "stop", answer.message.content
        jsonschema.validate(json.loads(answer.message.content), schema)
    assert [a.message.content for a in added] == [str(a + b) for a, b in sums]
    assert drafts and float(drafts.group(1)) > 0
