"""Server-sent events of a streamed request: framing, chunk shapes, usage, [DONE], errors."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from jaxllm.serve.choice import Choice
from jaxllm.serve.shaping import ChatShaping, CompletionShaping
from jaxllm.serve.streaming import sse, stream_events
from tests.jaxllm.serve.fakes import ByteCodec, ids, output, request

HEAD = {"id": "cmpl-1", "created": 123, "model": "tiny"}
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def _choices(n: int, stops=()) -> list[Choice]:
    return [Choice(i, request(f"r{i}"), list(stops), ByteCodec()) for i in range(n)]


def _runner(script: dict[int, list]):
    """``run_choice`` that feeds each choice the outputs in ``script[index]``; an exception
    in the script is raised at that point."""

    async def run(choice: Choice):
        for item in script[choice.index]:
            if isinstance(item, Exception):
                raise item
            choice.feed(item)
            yield
            if choice.finish_reason:
                return

    return run


class _CountLogprobs:
    """Log-probabilities shaped as their count, to see which chunk carries which."""

    def logprobs(self, items):
        return {"n": len(items)} if items else None


class _Chat(_CountLogprobs, ChatShaping):
    pass


class _Completion(_CountLogprobs, CompletionShaping):
    pass


def _shaping(chat: bool):
    req = SimpleNamespace(prompt_logprobs=None, logprobs=None, top_logprobs=None, echo=False)
    token_text = ByteCodec().token_text
    return _Chat(token_text, req, []) if chat else _Completion(token_text, req, lambda _: "")


def _stream(choices, script, *, chat: bool, include_usage: bool = False,
            continuous_usage: bool = False) -> list[str]:
    async def collect():
        events = stream_events(
            choices, _runner(script), _shaping(chat), head=HEAD,
            include_usage=include_usage, usage_of=lambda: USAGE,
            continuous_usage=continuous_usage)
        return [e async for e in events]

    return asyncio.run(collect())


def _payloads(events: list[str]) -> list[dict]:
    """Checks the SSE framing of every event; returns the JSON payloads before [DONE]."""
    assert events[-1] == "data: [DONE]\n\n"
    assert events.count("data: [DONE]\n\n") == 1
    out = []
    for e in events[:-1]:
        assert e.startswith("data: ") and e.endswith("\n\n") and "\n" not in e[:-2]
        out.append(json.loads(e[len("data: "):]))
    return out


def test_sse_framing():
    assert sse({"a": 1}) == 'data: {"a": 1}\n\n'
    assert sse({"text": "two\nlines"}) == 'data: {"text": "two\\nlines"}\n\n'


def test_completion_stream_one_chunk_per_token_then_finish():
    script = {0: [output("r0", ids("h")), output("r0", ids("i"), "length")]}
    payloads = _payloads(_stream(_choices(1), script, chat=False))
    for p in payloads:
        assert {k: p[k] for k in HEAD} == HEAD and p["object"] == "text_completion"
    bodies = [p["choices"][0] for p in payloads]
    assert bodies == [
        {"index": 0, "text": "h", "finish_reason": None, "logprobs": {"n": 1}},
        {"index": 0, "text": "i", "finish_reason": None, "logprobs": {"n": 1}},
        {"index": 0, "text": "", "finish_reason": "length", "logprobs": None},
    ]


def test_chat_stream_starts_with_the_role_and_ends_with_the_finish_reason():
    script = {0: [output("r0", ids("o")), output("r0", ids("k"), "stop")]}
    payloads = _payloads(_stream(_choices(1), script, chat=True))
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    bodies = [p["choices"][0] for p in payloads]
    assert bodies[0] == {"index": 0, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}
    assert [b["delta"] for b in bodies[1:]] == [{"content": "o"}, {"content": "k"}, {}]
    assert [b["finish_reason"] for b in bodies] == [None, None, None, "stop"]


def test_usage_chunk_only_when_asked_and_just_before_done():
    script = {0: [output("r0", ids("x"), "length")]}
    with_usage = _payloads(_stream(_choices(1), script, chat=True, include_usage=True))
    assert with_usage[-1] == {**HEAD, "object": "chat.completion.chunk", "choices": [],
                              "usage": USAGE}
    assert all("usage" not in p for p in with_usage[:-1])
    without = _payloads(_stream(_choices(1), script, chat=True))
    assert all("usage" not in p for p in without)


def test_stop_string_is_never_streamed():
    choices = _choices(1, stops=["END"])
    script = {0: [output("r0", [t]) for t in ids("abEND")] + [output("r0", ids("z"))]}
    bodies = [p["choices"][0] for p in _payloads(_stream(choices, script, chat=False))]
    assert "".join(b["text"] for b in bodies) == "ab"
    assert bodies[-1]["finish_reason"] == "stop"
    assert [b["finish_reason"] for b in bodies[:-1]] == [None] * (len(bodies) - 1)


def test_several_choices_each_get_their_text_and_one_finish_chunk():
    script = {0: [output("r0", ids("ab"), "length")],
              1: [output("r1", ids("x")), output("r1", ids("yz"), "stop")]}
    payloads = _payloads(_stream(_choices(2), script, chat=False))
    for index, text, reason in ((0, "ab", "length"), (1, "xyz", "stop")):
        bodies = [p["choices"][0] for p in payloads if p["choices"][0]["index"] == index]
        assert "".join(b["text"] for b in bodies) == text
        assert [b["finish_reason"] for b in bodies if b["finish_reason"]] == [reason]
        assert bodies[-1]["finish_reason"] == reason


def test_an_error_mid_stream_is_reported_in_stream_and_the_stream_still_ends():
    script = {0: [output("r0", ids("a")), RuntimeError("engine step failed: boom")],
              1: [output("r1", ids("b"), "length")]}
    payloads = _payloads(_stream(_choices(2), script, chat=False, include_usage=True))
    errors = [p for p in payloads if "error" in p]
    assert errors == [{"error": {"object": "error", "message": "engine step failed: boom",
                                 "type": "InternalServerError", "code": 500}}]
    finishes = {p["choices"][0]["index"]: p["choices"][0]["finish_reason"]
                for p in payloads if p.get("choices") and p["choices"][0]["finish_reason"]}
    assert finishes == {0: "abort", 1: "length"}
    assert "usage" in payloads[-1]


def test_a_choice_that_ends_without_a_finish_reason_reports_abort():
    payloads = _payloads(_stream(_choices(1), {0: [output("r0", ids("a"))]}, chat=True))
    assert payloads[-1]["choices"][0]["finish_reason"] == "abort"


def test_continuous_usage_puts_the_usage_in_every_chunk():
    script = {0: [output("r0", ids("a")), output("r0", ids("b"), "length")]}
    for chat in (False, True):
        payloads = _payloads(_stream(_choices(1), script, chat=chat, continuous_usage=True))
        assert len(payloads) >= 3 and all(p["usage"] == USAGE for p in payloads[1:])
        plain = _payloads(_stream(_choices(1), script, chat=chat))
        assert all("usage" not in p for p in plain)
