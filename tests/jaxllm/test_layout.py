"""The host -> device contract: the slot rule, the step builder's checks, and the host and
in-jit builders agreeing with each other and with the kernels' own reading of the metadata."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.kv_cache import CacheConfig
from jaxllm.layout import (
    SeqPiece,
    build_step,
    check_token_ids,
    contiguous_pages,
    decode_layout,
    pages_for,
    prefill_layout,
    slot_of,
)
from pallas_kernels import query_row_layout


def test_pages_for_and_slot_rule():
    assert [pages_for(n, 8) for n in (0, 1, 8, 9, 16, 17)] == [0, 1, 1, 2, 2, 3]
    table = np.array([[7, 2, 5]])
    pos = np.array([[0, 3, 4, 9, 11]])
    # Written out from the definition: page table[j // 4], offset j % 4.
    want = [[7 * 4 + 0, 7 * 4 + 3, 2 * 4 + 0, 5 * 4 + 1, 5 * 4 + 3]]
    assert slot_of(table, pos, 4).tolist() == want
    assert np.asarray(slot_of(jnp.asarray(table), jnp.asarray(pos), 4)).tolist() == want


def test_check_token_ids():
    assert check_token_ids([0, 9], 10).dtype == np.int32
    with pytest.raises(ValueError, match="Token id 10 is out of vocabulary"):
        check_token_ids([3, 10], 10)
    with pytest.raises(ValueError, match="Token id -1 is out of vocabulary"):
        check_token_ids([-1], 10)
    with pytest.raises(ValueError, match=r"must be integers, got 1\.5"):
        check_token_ids([1.5], 10)
    # Past int64 numpy holds Python ints as objects: the message still names the id.
    with pytest.raises(ValueError, match=f"Token id {2**70} is out of vocabulary"):
        check_token_ids([3, 2**70], 10)


def test_build_step_is_range_checked():
    cache = CacheConfig(page_size=8, num_pages=6)
    ok = build_step([SeqPiece([[3, 1]], 5, [1, 2, 3, 4])], cache, width=5, num_rows=16,
                    num_slots=1)
    assert ok.meta.block_tables.shape == (1, 1, 5) and ok.tokens.shape == (16,)
    assert ok.meta.slot_mapping[0, :4].tolist() == [3 * 8 + 5, 3 * 8 + 6, 3 * 8 + 7, 1 * 8 + 0]
    assert ok.meta.positions[:4].tolist() == [5, 6, 7, 8]
    assert ok.meta.slot_mapping[0, 4:].max() == -1
    cases = [
        ([SeqPiece([[1]], 6, [1, 2, 3])], "1 pages for 9 tokens"),
        ([SeqPiece([[1, 1, 2, 3, 4, 5]], 38, [1, 2, 3])], "at most 5 pages per sequence"),
        ([SeqPiece([[1, 7]], 0, [1])], "page ids must be in [0, 6]"),
        ([SeqPiece([[1]], 0, [])], "needs >= 1 new token"),
        ([SeqPiece([[1, 2, 3]], 0, [1] * 17)], "17 rows of 1 sequences do not fit a step of 16"),
        ([SeqPiece([[1], [2]], 0, [1])], "pages for 2 layer groups, the cache has 1"),
        ([SeqPiece([[0, 2]], 8, [1])], "layer group 0 has dropped a page"),
    ]
    for chunks, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            build_step(chunks, cache, width=5, num_rows=16, num_slots=1)


def test_chunked_groups_may_drop_pages_before_the_chunk():
    """A chunked group (chunk 10, pages of 4) at position 13 still needs pages from the
    chunk's start (position 10, page 2); page 0 and 1 may be the null page."""
    cache = CacheConfig(page_size=4, num_pages=9)
    step = build_step([SeqPiece([[1, 2, 3, 4], [0, 0, 5, 6]], 13, [7, 8])], cache, width=4,
                      num_rows=2, num_slots=1, group_chunk=(None, 10))
    assert step.meta.slot_mapping.tolist() == [[4 * 4 + 1, 4 * 4 + 2], [6 * 4 + 1, 6 * 4 + 2]]
    assert step.meta.block_tables[1, 0].tolist() == [0, 0, 5, 6]
    with pytest.raises(ValueError, match="layer group 1 has dropped a page"):
        build_step([SeqPiece([[1, 2, 3, 4], [0, 0, 0, 6]], 13, [7, 8])], cache, width=4,
                   num_rows=2, num_slots=1, group_chunk=(None, 10))


def _host(chunks, page_size, width, num_rows, num_slots, num_pages):
    cache = CacheConfig(page_size=page_size, num_pages=num_pages)
    return build_step(chunks, cache, width=width, num_rows=num_rows, num_slots=num_slots).meta


def _same(a, b) -> None:
    for name, x, y in zip(a._fields, a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


@pytest.mark.parametrize("page_size", [4, 16])
def test_host_and_in_jit_prefill_layouts_agree(page_size):
    lengths, max_len, width = [5, 1, 12], 12, pages_for(12, page_size)
    row, meta = jax.jit(prefill_layout, static_argnums=(1, 2, 3))(
        jnp.asarray(lengths, jnp.int32), max_len, width, page_size)
    chunks = [SeqPiece([contiguous_pages(0, b, len(lengths), width)], 0, [0] * n)
              for b, n in enumerate(lengths)]
    host = _host(chunks, page_size, width, len(lengths) * max_len, len(lengths),
                 len(lengths) * width)
    _same(meta, host)
    # Token i of prompt b goes to the flat row the host builder gave it.
    starts = np.cumsum([0] + lengths)
    for b, n in enumerate(lengths):
        assert np.asarray(row)[b, :n].tolist() == list(range(starts[b], starts[b] + n))


@pytest.mark.parametrize("page_size", [4, 16])
def test_host_and_in_jit_decode_layouts_agree(page_size):
    positions, width = np.array([4, 0, 31]), pages_for(32, page_size)
    meta = jax.jit(decode_layout, static_argnums=(2, 3))(
        jnp.asarray(positions, jnp.int32), jnp.ones(3, bool), width, page_size)
    chunks = [SeqPiece([contiguous_pages(0, b, 3, width)], int(p), [0])
              for b, p in enumerate(positions)]
    _same(meta, _host(chunks, page_size, width, 3, 3, 3 * width))


def _kernel_positions(meta) -> np.ndarray:
    """Positions as the kernels derive them, from seq_lens and query_start_loc."""
    num_rows = meta.positions.shape[0]
    _, pos, is_real = query_row_layout(jnp.asarray(meta.query_start_loc),
                                       jnp.asarray(meta.seq_lens),
                                       jnp.asarray(meta.num_seqs), num_rows)
    return np.where(np.asarray(is_real), np.asarray(pos), 0)


@pytest.mark.heavy
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 20)), min_size=1, max_size=5),
       st.sampled_from([1, 4, 16]), st.integers(0, 7))
def test_host_positions_are_what_the_kernels_read(seqs, page_size, padding):
    """Every builder's ``positions`` (used by RoPE and temperature tuning) equal the positions
    the attention kernels derive from ``seq_lens`` and ``query_start_loc``."""
    width = pages_for(60, page_size)
    chunks = [SeqPiece([contiguous_pages(0, s, len(seqs), width)], cached, [0] * new)
              for s, (cached, new) in enumerate(seqs)]
    rows = sum(new for _, new in seqs) + padding
    meta = _host(chunks, page_size, width, rows, len(seqs) + padding % 3, len(seqs) * width)
    np.testing.assert_array_equal(_kernel_positions(meta), meta.positions)
    table = meta.block_tables[0]  # the slot of every real row, written out from the rule
    for s, (cached, new) in enumerate(seqs):
        start = int(meta.query_start_loc[s])
        want = [table[s, j // page_size] * page_size + j % page_size
                for j in range(cached, cached + new)]
        assert meta.slot_mapping[0, start:start + new].tolist() == want


def test_in_jit_positions_are_what_the_kernels_read():
    _, meta = prefill_layout(jnp.asarray([3, 7, 1], jnp.int32), 8, 4, 4)
    np.testing.assert_array_equal(_kernel_positions(meta), np.asarray(meta.positions))
    meta = decode_layout(jnp.asarray([9, 0, 13], jnp.int32), jnp.ones(3, bool), 4, 4)
    np.testing.assert_array_equal(_kernel_positions(meta), np.asarray(meta.positions))
