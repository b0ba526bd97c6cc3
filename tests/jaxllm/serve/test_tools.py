"""Tool calls: reading calls back from text (JSON and pythonic), the constrained call schema
(checked with jsonschema), the prompt messages, and the streamed deltas."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from jaxllm.serve.protocol import ChatCompletionRequest
from jaxllm.serve.tools import (
    CallStream,
    call_schema,
    parse_tool_calls,
    prompt_messages,
    tool_instructions,
)

ADD = {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"]}}}
NOW = {"type": "function", "function": {"name": "now"}}
NAMES = ["add", "now"]


def calls(text: str) -> list[tuple[str, dict]] | None:
    parsed = parse_tool_calls(text, NAMES)
    if parsed is None:
        return None
    for call in parsed:
        assert call["type"] == "function" and call["id"].startswith("call_")
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed]


@pytest.mark.parametrize("text,expected", [
    ('{"name": "add", "parameters": {"a": 1, "b": 2}}', [("add", {"a": 1, "b": 2})]),
    (' {"name": "add", "arguments": {"a": 1, "b": 2}} ', [("add", {"a": 1, "b": 2})]),
    ('{"name": "add", "arguments": "{\\"a\\": 5}"}', [("add", {"a": 5})]),
    ('[{"name": "add", "parameters": {"a": 1}}, {"name": "now", "parameters": {}}]',
     [("add", {"a": 1}), ("now", {})]),
    ('{"name": "now", "parameters": {}}; {"name": "add", "parameters": {"b": 3}}',
     [("now", {}), ("add", {"b": 3})]),
    ('[add(a=1, b=-2), now()]', [("add", {"a": 1, "b": -2}), ("now", {})]),
    ("<|python_start|>[add(a=3, b=4)]<|python_end|>", [("add", {"a": 3, "b": 4})]),
    ('[add(a="x", b=[1, {"k": None}])]', [("add", {"a": "x", "b": [1, {"k": None}]})]),
])
def test_calls_are_read_back(text, expected):
    assert calls(text) == expected


@pytest.mark.parametrize("text", [
    "The answer is 3.", "", "{}", '{"name": "delete_all", "parameters": {}}',
    '{"name": "add", "parameters": {"a": 1}} and some words', "[add(1, 2)]",
    "[add(a=open('f'))]", '{"name": "add", "parameters": [1]}', "[now(), 3]",
    '{"name": "add", "parameters": {}, "extra": 1}',
])
def test_text_that_is_not_only_known_calls_is_content(text):
    assert calls(text) is None


def test_call_schema_accepts_exactly_calls_of_the_tools():
    named = call_schema([ADD, NOW], "add", parallel=True)
    jsonschema.validate({"name": "add", "parameters": {"a": 1, "b": 2}}, named)
    for bad in ({"name": "now", "parameters": {}}, {"name": "add", "parameters": {"a": 1}},
                {"name": "add", "parameters": {"a": "1", "b": 2}}, {"name": "add"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, named)
    required = call_schema([ADD, NOW], None, parallel=True)
    jsonschema.validate([{"name": "now", "parameters": {}},
                         {"name": "add", "parameters": {"a": 1, "b": 2}}], required)
    jsonschema.validate({"name": "now", "parameters": {}}, required)  # one call, bare
    for bad in ([], [{"name": "sub", "parameters": {}}], {"name": "add"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, required)
    single = call_schema([ADD, NOW], None, parallel=False)
    jsonschema.validate({"name": "now", "parameters": {"any": 1}}, single)
    with pytest.raises(ValueError, match="no tool named 'sub'"):
        call_schema([ADD], "sub", parallel=False)


def test_prompt_messages_for_a_template_without_tools():
    history = [{"role": "user", "content": "1 + 2?"},
               {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                   "name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    out = prompt_messages(history, [ADD], template_has_tools=False)
    assert out[0] == {"role": "system", "content": tool_instructions([ADD])}
    assert json.dumps(ADD["function"]) in out[0]["content"]
    assert out[2]["content"] == '{"name": "add", "parameters": {"a": 1, "b": 2}}'
    assert "tool_calls" not in out[2] and out[3]["content"] == "3"
    with_system = prompt_messages([{"role": "system", "content": "Be brief."}] + history[:1],
                                  [ADD], template_has_tools=False)
    assert with_system[0]["content"].endswith("Be brief.") and len(with_system) == 2
    # A template with its own tool section gets the calls with their arguments as objects.
    kept = prompt_messages(history, [ADD], template_has_tools=True)
    assert kept[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}
    assert [m["role"] for m in kept] == ["user", "assistant", "tool"]


def test_call_stream_holds_calls_and_passes_text():
    stream = CallStream(NAMES, named=False)
    deltas = [stream.delta(t) for t in ['{"name": "add", ', '"parameters": {"a": 1, "b": 2}}']]
    assert deltas == [{}, {}]  # held: it may be a call
    last, reason = stream.finish("", "stop")
    assert reason == "tool_calls"
    assert last[0]["tool_calls"][0]["function"] == {"name": "add", "arguments": ""}
    assert last[0]["tool_calls"][0]["index"] == 0 and last[0]["tool_calls"][0]["id"]
    assert json.loads(last[1]["tool_calls"][0]["function"]["arguments"]) == {"a": 1, "b": 2}

    text = CallStream(NAMES, named=False)
    assert text.delta("Hel") == {"content": "Hel"} and text.delta("lo") == {"content": "lo"}
    assert text.finish("!", "stop") == ([{"content": "!"}], "stop")

    cut = CallStream(NAMES, named=True)  # cut short: not a call, given back as content
    assert cut.delta('{"name": "ad') == {}
    assert cut.finish("", "length") == ([{"content": '{"name": "ad'}], "length")
    named = CallStream(NAMES, named=True)
    named.delta('{"name": "now", "parameters": {}}')
    assert named.finish("", "stop")[1] == "stop"  # OpenAI's finish reason for a named choice


@pytest.mark.parametrize("body,message", [
    (dict(tool_choice="required"), "tool_choice='required' needs 'tools'"),
    (dict(tools=[ADD], tool_choice={"type": "function", "function": {"name": "sub"}}),
     "names function 'sub', which is not in tools (add)"),
    (dict(tools=[ADD, ADD]), "tool names must be unique"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "name"),
    (dict(tools=[ADD], tool_choice="required", guided_regex="a"),
     "at most one structured-output constraint"),
])
def test_bad_tool_requests_are_refused(body, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **body)


def test_tool_modes():
    def mode(**kw):
        return ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **kw).tool_mode

    assert mode() == "none" and mode(tools=[ADD]) == "auto"
    assert mode(tools=[ADD], tool_choice="none") == "none"
    assert mode(tools=[ADD], tool_choice={"type": "function", "function": {"name": "add"}}) \
        == "named"
