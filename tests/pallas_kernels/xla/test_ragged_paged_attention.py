"""The blockwise jnp attention against the reference (the definition), and its memory bound."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels import ragged_paged_attention_reference
from pallas_kernels.xla.ragged_paged_attention import ragged_paged_attention_blockwise
from tests.pallas_kernels.triton.test_ragged_paged_attention import (
    CHUNK_EDGES,
    C,
    make_batch,
    naive_attention,
    ragged_layouts,
)


def check(batch, chunk_size, **options):
    out = ragged_paged_attention_blockwise(*batch.args, chunk_size=chunk_size, **options)
    ref = ragged_paged_attention_reference(*batch.args, chunk_size=chunk_size)
    got = np.asarray(out)
    assert out.shape == ref.shape and out.dtype == ref.dtype and np.all(np.isfinite(got))
    np.testing.assert_allclose(got, np.asarray(ref), atol=1e-5, rtol=1e-5)
    padding = int(batch.query_start_loc[int(batch.num_seqs)])
    assert not np.any(got[padding:])


# Chunks of 6 and 10 tokens do not fall on the 4-token page boundaries; 16 does.
@pytest.mark.parametrize("chunk_size", [None, C, 6, 10])
@pytest.mark.parametrize("pages_per_block", [1, 3, None])
def test_chunk_edges_equal_the_reference(chunk_size, pages_per_block):
    batch = make_batch(CHUNK_EDGES, width=16, num_slots=15, num_rows=128)
    check(batch, chunk_size, pages_per_block=pages_per_block)


def test_equals_naive_numpy_with_chunks_off_page_boundaries():
    batch = make_batch(CHUNK_EDGES, width=16, page_size=4)
    out = ragged_paged_attention_blockwise(*batch.args, chunk_size=6, pages_per_block=2)
    np.testing.assert_allclose(np.asarray(out), naive_attention(batch, 6), atol=1e-5)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seqs=ragged_layouts(), chunk_size=st.sampled_from([None, C, 5, 12]),
       seed=st.integers(0, 2**16))
def test_random_ragged_layouts(seqs, chunk_size, seed):
    batch = make_batch(seqs, num_slots=8, num_rows=48, width=16, num_pages=8 * 16 + 4,
                       seed=seed)
    check(batch, chunk_size, pages_per_block=2)


def test_memory_does_not_grow_with_the_context():
    """The compiled program's temporary memory is the same for a 64-page and a 4096-page
    block table: no buffer scales with max_model_len (the reference's does)."""
    def temp_bytes(fn, width):
        batch = make_batch([(8, 30), (1, 17)], width=width, num_pages=width + 8,
                           num_rows=16, num_slots=4)
        lowered = jax.jit(fn, static_argnames="chunk_size").lower(*batch.args, chunk_size=None)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    small, large = (temp_bytes(ragged_paged_attention_blockwise, w) for w in (64, 4096))
    assert large <= small * 1.05
    ref_small, ref_large = (temp_bytes(ragged_paged_attention_reference, w) for w in (64, 4096))
    assert ref_large > 20 * ref_small  # the definition materialises every key per row
