"""Helpers shared by the Triton-style kernels: block-size rules, chunk bounds, the dot and the
online-softmax update (checked against a numpy softmax)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.triton.common import (
    LOG2_E,
    check_block_size,
    chunk_start,
    dot,
    next_power_of_2,
    online_softmax_step,
    padded_head_dim,
)


@pytest.mark.parametrize("value", [16, 32, 128])
def test_block_sizes_that_are_powers_of_two_of_at_least_16_pass(value):
    check_block_size("block_q", value)


@pytest.mark.parametrize("value", [0, 8, 24, 48, 100])
def test_other_block_sizes_are_refused_by_name(value):
    with pytest.raises(ValueError, match=f"block_k={value}: must be a power of two >= 16"):
        check_block_size("block_k", value)


def test_next_power_of_2_and_padded_head_dim():
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 16, 17, 100)] == [1, 1, 2, 4, 16, 32, 128]
    assert [padded_head_dim(d) for d in (1, 8, 16, 40, 64, 128)] == [16, 16, 16, 64, 64, 128]


def test_chunk_start():
    pos = jnp.array([-3, 0, 5, 7, 8, 9, 23], jnp.int32)
    np.testing.assert_array_equal(chunk_start(pos, 8), [0, 0, 0, 0, 8, 8, 16])


def test_dot_accumulates_in_float32():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(12, dtype=np.float32).reshape(4, 3)
    out = dot(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16), trans_b=True)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, a @ b.T)
    np.testing.assert_array_equal(dot(jnp.asarray(a), jnp.asarray(b.T)), a @ b.T)


def _softmax_attention(scores, v, mask):
    scores = np.where(mask, scores, -np.inf)
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)) @ v


def test_online_softmax_over_blocks_equals_one_softmax():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 8)).astype(np.float32)
    v = rng.normal(size=(8, 4)).astype(np.float32)
    mask = np.ones((3, 8), bool)
    mask[1, :5] = False  # row 1 sees no key of the first block, and one of the second
    mask[2, ::2] = False
    carry = (jnp.zeros((3, 4)), jnp.full((3,), -jnp.inf), jnp.zeros((3,)))
    for block in (slice(0, 4), slice(4, 8)):
        carry = online_softmax_step(carry, jnp.asarray(scores[:, block] * LOG2_E),
                                    jnp.asarray(v[block]), jnp.asarray(mask[:, block]))
        assert np.isfinite(np.asarray(carry[0])).all()  # no inf - inf for the empty row
    acc, _, l_sum = carry
    np.testing.assert_allclose(np.asarray(acc) / np.asarray(l_sum)[:, None],
                               _softmax_attention(scores, v, mask), rtol=1e-5, atol=1e-6)
