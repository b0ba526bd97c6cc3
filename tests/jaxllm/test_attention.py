"""The attention registry: names, default, unknown names, and a newly registered
implementation being the one the model runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import attention
from jaxllm.layout import AttentionMetadata
from tests.jaxllm.conftest import random_model


@pytest.fixture
def registry(monkeypatch):
    """The registry, restored after the test (so test implementations do not leak)."""
    monkeypatch.setattr(attention, "_IMPLS", dict(attention._IMPLS))
    return attention


def test_todays_names_are_registered():
    assert {"xla", "pallas"} <= set(attention.attention_impls())


def test_default_is_pallas_on_gpu_and_xla_elsewhere():
    expected = "pallas" if jax.default_backend() == "gpu" else "xla"
    assert attention.default_attention_impl() == expected
    assert attention.check_attention_impl(None) == expected


def test_known_names_pass_and_unknown_names_are_refused():
    assert attention.check_attention_impl("xla") == "xla"
    assert attention.check_attention_impl("pallas") == "pallas"
    with pytest.raises(ValueError, match=r"attention_impl='flash': expected one of \("):
        attention.check_attention_impl("flash")


def test_a_name_cannot_be_registered_twice(registry):
    with pytest.raises(ValueError, match="'xla' is already registered"):
        registry.register("xla")(lambda *a, **k: None)


def test_paged_attention_dispatches_by_name(registry):
    calls = []

    @registry.register("test-echo")
    def echo(q, k_pages, v_pages, meta, *, chunk_size):
        calls.append(chunk_size)
        return q * 2

    assert "test-echo" in registry.attention_impls()
    assert registry.check_attention_impl("test-echo") == "test-echo"
    q = jnp.ones((3, 2, 4))
    meta = AttentionMetadata(*(jnp.zeros(1, jnp.int32) for _ in range(6)))
    out = registry.paged_attention(q, None, None, meta, chunk_size=16, impl="test-echo")
    np.testing.assert_array_equal(out, 2 * np.ones((3, 2, 4)))
    assert calls == [16]


def test_a_registered_implementation_is_what_the_model_runs(registry):
    seen = []

    @registry.register("test-zeros")
    def zeros(q, k_pages, v_pages, meta, *, chunk_size):
        seen.append((q.shape, k_pages.shape[1], meta.block_tables.shape, chunk_size))
        return jnp.zeros_like(q)

    ids = [[3, 1, 4, 1, 5]]
    reference = random_model("xla").logits(ids)
    replaced = random_model("test-zeros").logits(ids)
    # One layer of 4 heads of 16 dims over 5 rows; pages of 8 tokens, tables ceil(5 / 8) wide;
    # the layer uses the 16-token attention chunk.
    assert seen == [((5, 4, 16), 8, (1, 1), 16)]
    assert replaced.shape == reference.shape
    assert not np.allclose(replaced, reference, atol=1e-3)
