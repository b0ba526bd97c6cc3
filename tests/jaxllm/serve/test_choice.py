"""One choice as the client sees it: stop strings across tokens, hold-back, stop ids, the
incremental text, and the OpenAI shapes of log-probabilities."""

from __future__ import annotations

import pytest

from jaxllm.engine.engine import TokenLogprob
from jaxllm.serve.choice import Choice, chat_logprobs, completion_logprobs, token_text_fn
from tests.jaxllm.serve.fakes import ByteCodec, ids, output, request


def _choice(stops=(), stop_ids=(), codec=None) -> Choice:
    return Choice(0, request("r", stop_ids), list(stops), codec or ByteCodec())


def _feed_chars(choice: Choice, text: str, finish: str | None = None) -> list[str]:
    """Feeds ``text`` one byte-token at a time; returns the delta after each."""
    deltas = []
    tokens = ids(text)
    for i, t in enumerate(tokens):
        choice.feed(output("r", [t], finish if i == len(tokens) - 1 else None))
        deltas.append(choice.take_delta())
    return deltas


def test_without_stop_strings_every_token_is_emitted_at_once():
    choice = _choice()
    assert _feed_chars(choice, "abc", "length") == ["a", "b", "c"]
    assert choice.text == "abc" and choice.finish_reason == "length"
    assert choice.token_ids == ids("abc")


def test_stop_string_split_over_tokens_is_cut_and_never_emitted():
    choice = _choice(stops=["END"])
    deltas = _feed_chars(choice, "abEND")
    assert "".join(deltas) == choice.text == "ab" and choice.finish_reason == "stop"
    assert not any("E" in d for d in deltas)  # not even the start of the stop went out
    assert choice.token_ids == ids("abEND")  # the tokens are still counted


def test_partial_stop_is_held_back_until_the_finish():
    choice = _choice(stops=["END"])
    deltas = _feed_chars(choice, "xEN")
    assert "".join(deltas) in ("", "x")  # "EN" may still become "END"
    choice.feed(output("r", [], "length"))
    assert "".join(deltas) + choice.take_delta() == "xEN"
    assert choice.finish_reason == "length"


def test_partial_stop_followed_by_other_text_is_released():
    choice = _choice(stops=["END"])
    deltas = _feed_chars(choice, "ENxyz")
    assert choice.finish_reason is None and "".join(deltas).startswith("ENx")
    choice.feed(output("r", [], "length"))
    assert "".join(deltas) + choice.take_delta() == choice.text == "ENxyz"


def test_text_is_held_back_by_at_most_the_longest_stop_minus_one():
    choice = _choice(stops=["!", "STOP"])
    emitted = ""
    for n, delta in enumerate(_feed_chars(choice, "abcdef"), start=1):
        emitted += delta
        assert emitted == "abcdef"[: len(emitted)] and len(emitted) >= n - 3


def test_earliest_stop_string_wins_when_several_appear():
    choice = _choice(stops=["cd", "b"])
    choice.feed(output("r", ids("abcde")))
    assert choice.text == "a" and choice.finish_reason == "stop"
    assert choice.take_delta() == "a"


def test_stop_string_overrides_a_length_finish_in_the_same_output():
    choice = _choice(stops=["z"])
    choice.feed(output("r", ids("xyz"), "length"))
    assert (choice.text, choice.finish_reason) == ("xy", "stop")


def test_stop_token_text_is_not_output_but_the_token_is_counted():
    stop = ord("!")
    choice = _choice(stop_ids=[stop])
    choice.feed(output("r", ids("hi")))
    choice.feed(output("r", [stop], "stop", stop_token=stop))
    assert choice.text == "hi" and choice.finish_reason == "stop"
    assert choice.token_ids == ids("hi!") and len(choice.logprobs) == 3


def test_a_stop_id_that_ends_by_length_keeps_its_text():
    stop = ord("!")
    choice = _choice(stop_ids=[stop])
    choice.feed(output("r", ids("hi!"), "length"))
    assert choice.text == "hi!" and choice.finish_reason == "length"


def test_multibyte_character_split_over_tokens_is_never_emitted_half():
    choice = _choice()
    deltas = _feed_chars(choice, "h\u00e9\u20ac!")  # 1 + 2 + 3 + 1 bytes
    assert deltas == ["h", "", "\u00e9", "", "", "\u20ac", "!"]
    assert "\ufffd" not in choice.text


def test_stop_string_made_of_a_multibyte_character():
    choice = _choice(stops=["\u20ac"])
    choice.feed(output("r", ids("a\u20acb")))
    assert choice.text == "a" and choice.finish_reason == "stop"


def test_without_a_tokenizer_only_ids_are_kept():
    choice = Choice(0, request(), ["x"], None)
    choice.feed(output("r", [5, 6], "length"))
    assert choice.text == "" and choice.token_ids == [5, 6] and choice.take_delta() == ""


def test_token_text_without_a_tokenizer_names_the_id():
    assert token_text_fn(None)(42) == "token_id:42"
    assert token_text_fn(ByteCodec())(ord("a")) == "a"


ITEMS = [TokenLogprob(ord("a"), -0.5, [(ord("a"), -0.5), (ord("b"), -1.5), (ord("c"), -2.5)]),
         TokenLogprob(ord("d"), -0.25, [(ord("d"), -0.25), (ord("a"), -2.0), (ord("e"), -3.0)])]


def test_completion_logprobs_shape():
    text = token_text_fn(ByteCodec())
    assert completion_logprobs(text, None, ITEMS) is None
    assert completion_logprobs(text, 2, ITEMS) == {
        "tokens": ["a", "d"],
        "token_logprobs": [-0.5, -0.25],
        "top_logprobs": [{"a": -0.5, "b": -1.5}, {"d": -0.25, "a": -2.0}],
        "text_offset": [0, 1],
    }
    assert completion_logprobs(text, 0, ITEMS)["top_logprobs"] == [{}, {}]


def test_completion_text_offsets_count_characters_of_each_token():
    items = [TokenLogprob(t, -1.0, []) for t in (1000, 1001, 1002)]
    texts = {1000: "ab", 1001: "", 1002: "xyz"}
    out = completion_logprobs(texts.__getitem__, 0, items)
    assert out["text_offset"] == [0, 2, 2] and out["tokens"] == ["ab", "", "xyz"]


def test_chat_logprobs_shape():
    text = token_text_fn(ByteCodec())
    assert chat_logprobs(text, False, 5, ITEMS) is None
    out = chat_logprobs(text, True, 1, ITEMS)
    assert out == {"content": [
        {"token": "a", "logprob": -0.5, "bytes": [97],
         "top_logprobs": [{"token": "a", "logprob": -0.5, "bytes": [97]}]},
        {"token": "d", "logprob": -0.25, "bytes": [100],
         "top_logprobs": [{"token": "d", "logprob": -0.25, "bytes": [100]}]},
    ]}
    assert [len(c["top_logprobs"]) for c in chat_logprobs(text, True, 0, ITEMS)["content"]] \
        == [0, 0]


@pytest.mark.parametrize("token, expected", [("\u00e9", [0xC3, 0xA9]), ("", [])])
def test_chat_logprob_bytes_are_utf8(token, expected):
    out = chat_logprobs(lambda _: token, True, 0, [TokenLogprob(7, -1.0, [])])
    assert out["content"][0]["bytes"] == expected


def test_include_stop_str_in_output_keeps_the_stop_string_and_the_stop_token_text():
    choice = Choice(0, request("r"), ["cd"], ByteCodec(), include_stop=True)
    choice.feed(output("r", ids("abcdef")))
    assert (choice.text, choice.finish_reason) == ("abcd", "stop")
    stop = ord("!")
    choice = Choice(0, request("r", [stop]), [], ByteCodec(), include_stop=True)
    choice.feed(output("r", ids("hi!"), "stop", stop_token=stop))
    assert (choice.text, choice.finish_reason) == ("hi!", "stop")


def test_skip_special_tokens_false_keeps_special_token_text():
    special = 300  # decodes to "<s>" in the byte codec when kept
    kept = Choice(0, request("r"), [], ByteCodec(), skip_special=False)
    skipped = Choice(0, request("r"), [], ByteCodec())
    for choice in (kept, skipped):
        choice.feed(output("r", [*ids("a"), special, *ids("b")], "length"))
    assert (kept.text, skipped.text) == ("a<s>b", "ab")
