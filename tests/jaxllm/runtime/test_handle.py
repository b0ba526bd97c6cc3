"""The ``Model`` handle: full-sequence logits and their input checks, and the program cache.

A one-layer random model (parity with HF is test_model_parity's job): the checks here are
properties any correct causal LM has, independent of the weights."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm.buckets import ContextLengthError
from tests.jaxllm.conftest import random_model


@pytest.fixture(scope="module")
def model():
    return random_model()


def _ids(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 333, shape).tolist()


def test_logits_shape_and_rows_are_independent_and_causal(model):
    ids = _ids((2, 6))
    both = model.logits(ids)
    assert both.shape == (2, 6, 333) and both.dtype == np.float32
    assert np.isfinite(both).all()
    alone = model.logits(ids[1:])  # the second sequence on its own
    np.testing.assert_allclose(alone[0], both[1], rtol=1e-5, atol=1e-5)
    prefix = model.logits([ids[1][:4] + [7, 8]])  # same 4 tokens, different future
    np.testing.assert_allclose(prefix[0, :4], both[1, :4], rtol=1e-5, atol=1e-5)
    assert not np.allclose(both[0], both[1])


@pytest.mark.parametrize("ids, error, message", [
    ([1, 2, 3], ValueError, r"\[batch, length\]"),
    ([[]], ValueError, r"\[batch, length\]"),
    ([[1, 333]], ValueError, "Token id 333 is out of vocabulary"),
    ([[-1, 2]], ValueError, "Token id -1 is out of vocabulary"),
    ([[1] * 33], ContextLengthError, "maximum context length is 32 tokens"),
])
def test_bad_inputs_are_refused_before_any_device_work(model, ids, error, message):
    with pytest.raises(error, match=message):
        model.logits(ids)


def test_max_model_len_tokens_are_accepted(model):
    assert model.logits([[5] * 32]).shape == (1, 32, 333)


def test_compiled_builds_each_key_once(model):
    built = []

    def build():
        built.append(1)
        return object()

    first = model.compiled(("test-key", 1), build)
    assert model.compiled(("test-key", 1), build) is first
    model.compiled(("test-key", 2), build)
    assert len(built) == 2


def test_unknown_attention_impl_is_refused():
    with pytest.raises(ValueError, match="attention_impl='nope'"):
        random_model("nope")
