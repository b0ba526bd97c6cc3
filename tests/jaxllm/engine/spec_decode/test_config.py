"""SpeculativeConfig.from_json: vLLM's JSON shape and defaults, and errors that name the value
and the limit."""

from __future__ import annotations

import json

import pytest

from jaxllm.engine.spec_decode.config import MAX_SPECULATIVE_TOKENS, SpeculativeConfig


def _parse(**raw) -> SpeculativeConfig:
    return SpeculativeConfig.from_json(json.dumps(raw))


@pytest.mark.parametrize("given,expected", [
    ({}, (5, 5)),  # vLLM's defaults when neither size is given
    ({"prompt_lookup_max": 3}, (3, 3)),
    ({"prompt_lookup_min": 2}, (2, 2)),
    ({"prompt_lookup_min": 2, "prompt_lookup_max": 4}, (2, 4)),
])
def test_ngram_sizes_default_as_in_vllm(given, expected):
    c = _parse(method="ngram", num_speculative_tokens=3, **given)
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == expected
    assert c.method == "ngram" and c.num_speculative_tokens == 3 and c.model is None
    assert c.rows_per_sequence == 4


def test_ngram_named_by_model_as_vllm_accepts():
    c = _parse(model="ngram", num_speculative_tokens=2, prompt_lookup_max=4)
    assert c.method == "ngram" and c.model is None and c.prompt_lookup_min == 4


def test_eagle3_reads_model_path():
    c = _parse(method="eagle3", model="/ckpt/head", num_speculative_tokens=3)
    assert (c.method, c.model, c.prompt_lookup_min) == ("eagle3", "/ckpt/head", None)


@pytest.mark.parametrize("raw,words", [
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_mn": 2},
     ["unknown keys", "prompt_lookup_mn"]),
    ({"method": "medusa", "num_speculative_tokens": 3}, ["'medusa'", "ngram, eagle3"]),
    ({"method": "ngram"}, ["num_speculative_tokens"]),
    ({"num_speculative_tokens": 3}, ["needs method"]),
    ({"method": "ngram", "num_speculative_tokens": 0}, ["num_speculative_tokens=0", "[1, 16]"]),
    ({"method": "ngram", "num_speculative_tokens": MAX_SPECULATIVE_TOKENS + 1},
     [f"num_speculative_tokens={MAX_SPECULATIVE_TOKENS + 1}", "[1, 16]"]),
    ({"method": "ngram", "num_speculative_tokens": True}, ["True", "integer"]),
    ({"method": "ngram", "num_speculative_tokens": 2.0}, ["2.0", "integer"]),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 0},
     ["prompt_lookup_min=0", "[1, 64]"]),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 65},
     ["prompt_lookup_max=65", "[1, 64]"]),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 4,
      "prompt_lookup_max": 2}, ["prompt_lookup_min=4", "prompt_lookup_max=2"]),
    ({"method": "ngram", "num_speculative_tokens": 3, "model": "/ckpt"}, ["'/ckpt'", "no model"]),
    ({"method": "eagle3", "num_speculative_tokens": 3}, ["needs model", "None"]),
    ({"method": "eagle3", "num_speculative_tokens": 3, "model": "/m", "prompt_lookup_max": 3},
     ["prompt_lookup_max=3", "ngram"]),
])
def test_bad_settings_name_the_value_and_the_limit(raw, words):
    with pytest.raises(ValueError) as e:
        SpeculativeConfig.from_json(json.dumps(raw))
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("text,words", [("{method: ngram}", "not valid JSON"),
                                        ("[1, 2]", "JSON object, got list")])
def test_not_an_object(text, words):
    with pytest.raises(ValueError, match=words):
        SpeculativeConfig.from_json(text)
