"""The pure-jnp references (``pallas_kernels.reference``) against attention written out in numpy
from its definition, at the chunk edges: every kernel and the XLA path are checked against
these references, so the references are checked against the definition first."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention_reference, ragged_paged_attention_reference
from tests.pallas_kernels.triton.test_flash_attention import CASES, make_inputs, naive_attention
from tests.pallas_kernels.triton.test_ragged_paged_attention import CHUNK_EDGES, C, make_batch
from tests.pallas_kernels.triton.test_ragged_paged_attention import (
    naive_attention as naive_ragged,
)


@pytest.mark.parametrize("case", ["chunk_straddle_prefix", "ragged_gqa2_dim24",
                                  "noncausal_kvlen", "sees_nothing", "chunk_2C+1_gqa2"])
def test_flash_reference_matches_naive_numpy(case):
    batch, num_q, seq_k, heads, kv_heads, head_dim, causal, chunk, q_off, kv_len = CASES[case]
    q, k, v = make_inputs(batch, num_q, seq_k, heads, kv_heads, head_dim)
    q_off = [0] * batch if q_off is None else q_off
    kv_len = [seq_k] * batch if kv_len is None else kv_len
    ref = flash_attention_reference(q, k, v, causal=causal, chunk_size=chunk,
                                    q_offsets=jnp.asarray(q_off), kv_lengths=jnp.asarray(kv_len))
    want = naive_attention(q, k, v, causal=causal, chunk_size=chunk, q_offsets=q_off,
                           kv_lengths=kv_len, scale=head_dim**-0.5)
    np.testing.assert_allclose(np.asarray(ref), want, atol=1e-5, rtol=1e-5)


def test_ragged_reference_matches_naive_numpy():
    batch = make_batch(CHUNK_EDGES, width=16)
    for chunk_size in (None, C):
        ref = ragged_paged_attention_reference(*batch.args, chunk_size=chunk_size)
        np.testing.assert_allclose(np.asarray(ref), naive_ragged(batch, chunk_size),
                                   atol=1e-5, rtol=1e-5)
