"""OpenAI request models: validation bounds, stop strings, sampling parameters, error body."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from jaxllm.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeRequest,
    error_body,
)

MESSAGES = [{"role": "user", "content": "hi"}]


def _chat(**kwargs) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=MESSAGES, **kwargs)


@pytest.mark.parametrize("field, ok, bad", [
    ("max_tokens", [1, 10_000], [0, -1]),
    ("temperature", [0.0, 100.0], [-0.01, 100.01]),
    ("top_p", [1e-6, 1.0], [0.0, 1.01]),
    ("top_k", [-1, 0, 50, 2**31 - 1], [-2, 2**31]),
    ("min_p", [0.0, 1.0], [-0.1, 1.1]),
    ("n", [1, 16], [0, 17]),
    ("seed", [0, 2**63 - 1], [-1, 2**63]),
    ("max_tokens", [2**31 - 1], [2**31]),
    ("max_completion_tokens", [1], [0]),
    ("top_logprobs", [0, 20], [-1, 21]),
])
def test_chat_validation_bounds(field, ok, bad):
    for value in ok:
        assert getattr(_chat(**{field: value}), field) == value
    for value in bad:
        with pytest.raises(ValidationError, match=field):
            _chat(**{field: value})


@pytest.mark.parametrize("logprobs, valid", [(0, True), (20, True), (21, False), (-1, False)])
def test_completion_logprobs_bounds(logprobs, valid):
    if valid:
        assert CompletionRequest(prompt="x", logprobs=logprobs).logprobs == logprobs
    else:
        with pytest.raises(ValidationError, match="logprobs"):
            CompletionRequest(prompt="x", logprobs=logprobs)


@pytest.mark.parametrize("prompt", ["text", [1, 2, 3], ["a", "b"], [[1, 2], [3]]])
def test_completion_prompt_forms(prompt):
    assert CompletionRequest(prompt=prompt).prompt == prompt


def test_chat_needs_messages_with_known_roles():
    with pytest.raises(ValidationError, match="messages"):
        ChatCompletionRequest(messages=[])
    with pytest.raises(ValidationError, match="role"):
        ChatCompletionRequest(messages=[{"role": "robot", "content": "hi"}])
    parts = [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]
    req = ChatCompletionRequest(messages=[{"role": "user", "content": parts}])
    assert req.messages[0].text() == "hi there"


def test_image_url_parts_are_read_in_order():
    parts = [{"type": "text", "text": "look: "},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
             {"type": "image_url", "image_url": {"url": "https://h/b.png", "detail": "auto"}}]
    [message] = ChatCompletionRequest(messages=[{"role": "user", "content": parts}]).messages
    assert message.image_urls() == ["data:image/png;base64,AAAA", "https://h/b.png"]
    assert message.text() == "look: "


@pytest.mark.parametrize("part, needle", [
    ({"type": "text", "text": 5}, "messages.0.content.parts.0.text"),
    ({"type": "text"}, "a text content part needs 'text'"),
    ({"type": "input_image", "input_image": "http://x/y.png"},
     "'input_image' is not supported: send images as {'type': 'image_url'"),
    ({"type": "image_url"}, "an image_url content part needs 'image_url'"),
    ({"type": "image_url", "image_url": {"url": "data:,", "detail": "low"}},
     "image_url.detail 'low' is not supported"),
    ({"type": "input_audio", "input_audio": {}}, "'input_audio' is not supported"),
])
def test_content_parts_other_than_text_are_refused(part, needle):
    with pytest.raises(ValidationError, match=re.escape(needle)):
        ChatCompletionRequest(messages=[{"role": "user", "content": [part]}])


@pytest.mark.parametrize("name, value", [
    ("functions", [{"name": "f"}]), ("function_call", "auto"),
    ("guided_whitespace_pattern", " *"), ("guided_decoding_backend", "xgrammar"),
])
def test_unsupported_parameters_are_refused_by_name(name, value):
    for make in (lambda **kw: _chat(**kw), lambda **kw: CompletionRequest(prompt="x", **kw)):
        with pytest.raises(ValidationError, match=f"'{name}' is not supported by this server"):
            make(**{name: value})


@pytest.mark.parametrize("name, value, needle", [
    ("presence_penalty", 2.5, "less than or equal to 2"),
    ("frequency_penalty", -2.01, "greater than or equal to -2"),
    ("repetition_penalty", 0.0, "greater than 0"),
    ("repetition_penalty", -1.0, "greater than 0"),
])
def test_penalties_out_of_range_are_refused(name, value, needle):
    for make in (lambda **kw: _chat(**kw), lambda **kw: CompletionRequest(prompt="x", **kw)):
        with pytest.raises(ValidationError, match=needle):
            make(**{name: value})


def test_penalties_reach_the_sampling_params():
    params = _chat(presence_penalty=0.5, frequency_penalty=-1.0,
                   repetition_penalty=1.3).sampling(None, 0)
    assert (params.presence_penalty, params.frequency_penalty,
            params.repetition_penalty) == (0.5, -1.0, 1.3)
    assert params.has_penalties
    off = CompletionRequest(prompt="x", presence_penalty=None, frequency_penalty=None,
                            repetition_penalty=None).sampling(None, 0)
    assert not off.has_penalties


def test_completion_only_parameters():
    with pytest.raises(ValidationError, match="'suffix' is not supported"):
        CompletionRequest(prompt="x", suffix="end")
    for name, value in (("suffix", "end"), ("echo", True)):
        _chat(**{name: value})  # not chat parameters at all: unknown there, logged, ignored


def test_scoring_the_prompt():
    """echo with logprobs, or prompt_logprobs, scores the prompt; max_tokens=0 only then."""
    assert CompletionRequest(prompt="x", echo=True, logprobs=2, max_tokens=0).scores_prompt == 2
    assert CompletionRequest(prompt="x", echo=True).scores_prompt is None
    assert CompletionRequest(prompt="x", echo=True, logprobs=1,
                             prompt_logprobs=4).scores_prompt == 4
    assert _chat(prompt_logprobs=3).scores_prompt == 3
    with pytest.raises(ValidationError, match="max_tokens=0 generates nothing"):
        CompletionRequest(prompt="x", max_tokens=0)
    with pytest.raises(ValidationError, match="'echo' is not supported with stream=true"):
        CompletionRequest(prompt="x", echo=True, stream=True)
    with pytest.raises(ValidationError, match="not supported with stream=true"):
        _chat(prompt_logprobs=1, stream=True)


def test_values_that_change_nothing_are_accepted():
    neutral = dict(presence_penalty=0, frequency_penalty=0.0, repetition_penalty=1.0,
                   logit_bias={}, min_tokens=0, tools=[], tool_choice="none",
                   response_format={"type": "text"}, user="me", parallel_tool_calls=True,
                   best_of=2, n=2)
    assert _chat(**neutral).n == 2
    assert CompletionRequest(prompt="x", echo=False, suffix="", **neutral).n == 2


def test_unknown_are_logged_and_best_of_other_than_n_is_refused(caplog):
    with caplog.at_level("WARNING", logger="jaxllm.serve"):
        assert _chat(foo=1, bar=2).n == 1  # like vLLM: logged as ignored
    assert "ignoring unknown request parameter 'foo'" in caplog.text
    assert "'bar'" in caplog.text
    with pytest.raises(ValidationError, match="best_of=3, n=1"):
        _chat(best_of=3)
    with pytest.raises(ValidationError, match="continuous_usage"):
        _chat(stream_options={"continuous_usage": True})  # a misspelt option


def test_max_completion_tokens_on_both_endpoints():
    assert CompletionRequest(prompt="x", max_completion_tokens=7).token_limit == 7
    assert _chat(max_tokens=5).token_limit == 5
    assert _chat(max_tokens=5, max_completion_tokens=5).token_limit == 5
    with pytest.raises(ValidationError, match="disagree"):
        _chat(max_tokens=5, max_completion_tokens=6)


def test_defaults():
    req = _chat()
    assert (req.temperature, req.top_p, req.top_k, req.min_p, req.n) == (1.0, 1.0, -1, 0.0, 1)
    assert req.max_tokens is None and req.seed is None and not req.stream
    assert req.logprobs is False and req.add_generation_prompt is True
    assert req.stop_strings() == [] and req.include_usage is False


@pytest.mark.parametrize("stop, expected", [
    (None, []), ("###", ["###"]), (["a", "bc"], ["a", "bc"]), ([], []),
])
def test_stop_strings(stop, expected):
    assert _chat(stop=stop).stop_strings() == expected


@pytest.mark.parametrize("stop", ["", ["ok", ""]])
def test_empty_stop_string_is_refused(stop):
    with pytest.raises(ValueError, match="stop strings must not be empty"):
        _chat(stop=stop).stop_strings()


def test_sampling_parameters_carry_every_field():
    req = _chat(temperature=0.5, top_p=0.9, top_k=7, min_p=0.1, seed=11,
                stop_token_ids=[3, 4])
    params = req.sampling(max_tokens=20, seed_offset=2)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.5, 0.9, 7, 0.1)
    assert params.max_tokens == 20 and params.stop_token_ids == (3, 4)
    assert params.seed == 13  # each choice of n gets the request's seed plus its index


def test_seed_offset_wraps_into_the_valid_range_and_no_seed_stays_none():
    assert _chat(seed=2**63 - 1).sampling(None, seed_offset=3).seed == 2
    assert _chat().sampling(None, seed_offset=3).seed is None
    assert _chat().sampling(None, 0).stop_token_ids == ()


def test_include_usage_needs_stream_options():
    assert not _chat(stream=True).include_usage
    assert not _chat(stream=True, stream_options={"include_usage": False}).include_usage
    assert _chat(stream=True, stream_options={"include_usage": True}).include_usage


def test_tokenize_request_defaults():
    req = TokenizeRequest(prompt="x")
    assert req.messages is None and req.add_special_tokens is True


def test_error_body():
    assert error_body("bad", 400) == {"object": "error", "message": "bad",
                                      "type": "BadRequestError", "code": 400}
    assert error_body("gone", 404, "NotFoundError")["type"] == "NotFoundError"
