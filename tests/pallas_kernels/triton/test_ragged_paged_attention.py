"""ragged_paged_attention (interpret mode) against ragged_paged_attention_reference, the
reference against a naive per-sequence numpy attention."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import triton as plgpu

from jaxllm.kv_cache import write_kv_pages
from pallas_kernels import (
    flash_attention,
    ragged_paged_attention,
    ragged_paged_attention_reference,
)
from pallas_kernels.triton.ragged_paged_attention import _tile_metadata
from tests.pallas_kernels.triton.test_flash_attention import check_triton_ir, lower_for_cuda

pytestmark = pytest.mark.heavy  # kernels in interpret mode: seconds each (tests/conftest.py)


@dataclasses.dataclass
class Batch:
    """One engine step: flat query rows of live sequences, then padding rows and slots."""

    q: jax.Array
    k_pages: jax.Array
    v_pages: jax.Array
    block_tables: jax.Array
    seq_lens: jax.Array
    query_start_loc: jax.Array
    num_seqs: jax.Array

    @property
    def args(self):
        return (self.q, self.k_pages, self.v_pages, self.block_tables, self.seq_lens,
                self.query_start_loc, self.num_seqs)


def make_batch(
    seqs, *, heads=4, kv_heads=2, head_dim=16, page_size=4, width=16, num_slots=None,
    num_rows=None, num_pages=None, dtype=jnp.float32, seed=0, stale_table=True,
):
    """``seqs`` is a list of (q_len, seq_len). Pages go to sequences in a random order; every
    page no sequence owns is NaN, and table entries past a sequence's pages are stale ids
    (other sequences' pages, NaN pages, or out of range), as a reused block table would be."""
    rng = np.random.default_rng(seed)
    num_slots = num_slots or len(seqs) + 2
    num_rows = num_rows or sum(q for q, _ in seqs) + 3
    needed = [-(-s // page_size) for _, s in seqs]
    num_pages = num_pages or sum(needed) + 5
    assert all(n <= width for n in needed) and sum(q for q, _ in seqs) <= num_rows

    order = rng.permutation(num_pages)
    tables = rng.integers(-2, num_pages + 3, (num_slots, width)) if stale_table else (
        np.zeros((num_slots, width)))
    used = 0
    for s, n in enumerate(needed):
        tables[s, :n] = order[used:used + n]
        used += n
    k_pages = rng.standard_normal((num_pages, page_size, kv_heads, head_dim))
    v_pages = rng.standard_normal((num_pages, page_size, kv_heads, head_dim))
    k_pages[order[used:]] = np.nan
    v_pages[order[used:]] = np.nan

    q_lens = [q for q, _ in seqs]
    query_start_loc = np.zeros(num_slots + 1, np.int64)
    query_start_loc[1:len(seqs) + 1] = np.cumsum(q_lens)
    query_start_loc[len(seqs) + 1:] = query_start_loc[len(seqs)]
    seq_lens = np.zeros(num_slots, np.int64)
    seq_lens[:len(seqs)] = [s for _, s in seqs]
    q = rng.standard_normal((num_rows, heads, head_dim))
    return Batch(
        q=jnp.asarray(q, dtype),
        k_pages=jnp.asarray(k_pages, dtype),
        v_pages=jnp.asarray(v_pages, dtype),
        block_tables=jnp.asarray(tables, jnp.int32),
        seq_lens=jnp.asarray(seq_lens, jnp.int32),
        query_start_loc=jnp.asarray(query_start_loc, jnp.int32),
        num_seqs=jnp.int32(len(seqs)),
    )


def naive_attention(batch: Batch, chunk_size):
    """Walk each sequence's pages, then a float64 softmax per query row and head."""
    q, kp, vp, tables, seq_lens, qsl = (np.asarray(x, np.float64) if x.dtype != jnp.int32
                                        else np.asarray(x) for x in batch.args[:6])
    num_rows, heads, head_dim = q.shape
    page_size, kv_heads = kp.shape[1], kp.shape[2]
    out = np.zeros_like(q)
    for s in range(int(batch.num_seqs)):
        seq_len, start, stop = seq_lens[s], qsl[s], qsl[s + 1]
        keys = np.stack([kp[tables[s, j // page_size], j % page_size] for j in range(seq_len)])
        vals = np.stack([vp[tables[s, j // page_size], j % page_size] for j in range(seq_len)])
        for row in range(start, stop):
            pos = seq_len - (stop - start) + (row - start)
            first = 0 if chunk_size is None else pos // chunk_size * chunk_size
            for h in range(heads):
                kvh = h // (heads // kv_heads)
                scores = keys[first:pos + 1, kvh] @ q[row, h] * head_dim**-0.5
                w = np.exp(scores - scores.max())
                out[row, h] = w @ vals[first:pos + 1, kvh] / w.sum()
    return out


def check(batch: Batch, chunk_size, atol=1e-5, interpret=True, **kernel_options):
    out = ragged_paged_attention(*batch.args, chunk_size=chunk_size, interpret=interpret,
                                 **kernel_options)
    ref = ragged_paged_attention_reference(*batch.args, chunk_size=chunk_size)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    got = np.asarray(out, np.float32)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, np.asarray(ref, np.float32), atol=atol, rtol=atol)
    padding = int(batch.query_start_loc[int(batch.num_seqs)])
    assert not np.any(got[padding:])
    return out


C = 16  # chunk size of the interpret tests (Llama 4 uses 8192)
# Decodes and prefills at C-1, C, C+1, 2C+1, prefills over a cached prefix that straddle one
# or two chunk boundaries, a sequence with no new rows, and lengths around block_q = 8.
CHUNK_EDGES = [(1, C - 1), (1, C), (1, C + 1), (1, 2 * C + 1), (C - 1, C - 1), (C, C),
               (C + 1, C + 1), (20, 40), (2 * C + 1, 2 * C + 1), (0, 9), (7, 30), (9, 9)]


@pytest.mark.parametrize("chunk_size", [None, C])
@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_chunk_edges_mixed_decode_and_prefill(chunk_size, num_kv_splits):
    batch = make_batch(CHUNK_EDGES, width=16, num_slots=15, num_rows=128)
    check(batch, chunk_size, block_q=8, pages_per_block=4, num_kv_splits=num_kv_splits)


@pytest.mark.parametrize(
    "heads, kv_heads, block_q",
    [(2, 2, 16), (4, 2, 8), (16, 2, 2), (10, 2, 2)],  # GQA 1, 2, 8, and 5 (padded to 8)
)

def test_gqa_ratios(heads, kv_heads, block_q):
    seqs = [(1, 17), (17, 17), (15, 33), (1, 1), (16, 20)]
    batch = make_batch(seqs, heads=heads, kv_heads=kv_heads, width=12)
    check(batch, C, block_q=block_q, pages_per_block=4, num_kv_splits=2)


def test_prefills_take_per_head_tiles_decodes_grouped_tiles():
    """GQA 5 (padded to 8) with default blocks: 8-token grouped tiles, 64-token per-head
    tiles. Prefills of more than 40 tokens read K/V fewer times per head (ceil(q/64) * 10 <
    ceil(q/8) * 2) and take per-head tiles, including one that spans two of them; decodes
    and short chunks stay grouped."""
    seqs = [(100, 130), (1, 50), (64, 64), (8, 20), (41, 41), (40, 90)]
    batch = make_batch(seqs, heads=10, kv_heads=2, head_dim=16, page_size=4, width=40)
    meta = _tile_metadata(batch.query_start_loc, batch.seq_lens, batch.num_seqs,
                          num_tiles=40, block_q=8, group_pad=8, num_heads=10, num_kv_heads=2,
                          max_kv_len=160)
    meta = np.asarray(meta)
    used = meta[meta[:, 2] > 0]
    per_head = {int(seq): bool(flag) for seq, flag in used[:, [0, 5]]}
    assert per_head == {0: True, 1: False, 2: True, 3: False, 4: True, 5: False}
    assert list(used[used[:, 0] == 0, 2]) == [64, 36]  # tokens per tile of the 100-token prefill
    for chunk in (None, C):
        check(batch, chunk)


def test_head_dim_padded_and_default_blocks():
    """head_dim 24 runs padded to 32; block_q, pages_per_block and splits from defaults."""
    batch = make_batch([(1, 50), (30, 45), (3, 3)], heads=8, kv_heads=1, head_dim=24,
                       page_size=8, width=8)
    check(batch, C)


@pytest.mark.parametrize("num_kv_splits", [1, 2])
def test_max_model_len_not_multiple_of_chunk(num_kv_splits):
    """max_model_len 42 with C=16 and 4-token pages: the block table is exactly 11 pages wide
    and the last chunk (32..41) is partial. KV blocks of 16 keys reach column 11 there; the
    kernel must clip it instead of reading past the table."""
    max_model_len, page_size = 42, 4
    width = -(-max_model_len // page_size)
    seqs = [(1, 42), (10, 42), (1, 41), (9, 40), (1, 33), (12, 36), (1, 32)]
    batch = make_batch(seqs, page_size=page_size, width=width)
    check(batch, C, block_q=8, pages_per_block=4, num_kv_splits=num_kv_splits)


def record_gather_bounds(monkeypatch) -> list[tuple[tuple[int, ...], int, int, int]]:
    """Wraps the Triton load/store so that every integer index array they get reports
    (ref shape, dim, min, max) at run time, masked-off lanes included: on a GPU the kernel
    must not even form an address past an array, such as a block-table column >= width."""
    seen = []

    def spy(real):
        def wrapped(ref, *args, **kwargs):
            shape = ref.ref.shape
            for dim, index in enumerate(ref.transforms[-1].indices):
                if isinstance(index, jax.Array) and index.ndim:
                    jax.debug.callback(
                        lambda lo, hi, shape=shape, dim=dim: seen.append((shape, dim, lo, hi)),
                        jnp.min(index), jnp.max(index))
            return real(ref, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(plgpu, "load", spy(plgpu.load))
    monkeypatch.setattr(plgpu, "store", spy(plgpu.store))
    return seen


def test_indices_stay_inside_every_array(monkeypatch):
    """The max_model_len-not-a-multiple-of-C layout: 16-key blocks reach block-table
    column 11 of an 11-wide table, which must be clipped (JAX itself would clamp quietly)."""
    jax.clear_caches()  # trace afresh, through the spy
    seen = record_gather_bounds(monkeypatch)
    width = 11
    batch = make_batch([(1, 42), (10, 42), (1, 33)], page_size=4, width=width)
    ragged_paged_attention(*batch.args, chunk_size=C, block_q=8, pages_per_block=4,
                           num_kv_splits=2, interpret=True).block_until_ready()
    jax.effects_barrier()
    jax.clear_caches()  # later tests must not reuse the spying trace
    assert seen
    for shape, dim, lo, hi in seen:
        assert 0 <= lo and hi < shape[dim], (shape, dim, lo, hi)
    table_cols = [hi for shape, dim, _, hi in seen if shape == batch.block_tables.shape
                  and dim == 1]
    assert max(table_cols) == width - 1


def test_max_model_len_below_chunk():
    max_model_len, page_size, chunk = 22, 4, 64
    seqs = [(1, 22), (22, 22), (5, 22), (7, 7), (1, 1)]
    batch = make_batch(seqs, page_size=page_size, width=-(-max_model_len // page_size))
    check(batch, chunk, block_q=8, pages_per_block=4, num_kv_splits=2)


def test_no_live_sequences():
    batch = make_batch([(3, 5)], num_rows=8)
    batch.num_seqs = jnp.int32(0)
    check(batch, C, block_q=8, pages_per_block=4)


@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_owned_pages_outside_the_chunk_are_skipped(num_kv_splits):
    """Keys 0..63 are owned but in an earlier chunk than every query (positions 64..69).
    V is zeroed only for unowned keys, so NaN there reaches the output iff a block is read."""
    batch = make_batch([(1, 70), (6, 70)], width=20)
    clean = ragged_paged_attention_reference(*batch.args, chunk_size=64)
    for s in range(2):
        first_pages = batch.block_tables[s, :16]
        batch.k_pages = batch.k_pages.at[first_pages].set(jnp.nan)
        batch.v_pages = batch.v_pages.at[first_pages].set(jnp.nan)
    out = ragged_paged_attention(*batch.args, chunk_size=64, block_q=8, pages_per_block=4,
                                 num_kv_splits=num_kv_splits, interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(clean), atol=1e-5, rtol=1e-5)


def test_bf16():
    """bf16 in and out; within 2e-2 (observed: at most one bf16 ulp of outputs below 4)."""
    batch = make_batch(CHUNK_EDGES, width=16, dtype=jnp.bfloat16)
    check(batch, C, atol=2e-2, block_q=8, pages_per_block=4, num_kv_splits=2)


def test_rejects_bad_block_sizes():
    batch = make_batch([(1, 5)], heads=2, kv_heads=2)
    with pytest.raises(ValueError, match="block_q"):
        ragged_paged_attention(*batch.args, block_q=8, interpret=True)
    with pytest.raises(ValueError, match="pages_per_block"):
        ragged_paged_attention(*batch.args, block_q=16, pages_per_block=3, interpret=True)


@st.composite
def ragged_layouts(draw):
    """Up to 6 live sequences of a 64-token max_model_len in 48 flat rows."""
    num_seqs = draw(st.integers(0, 6))
    seqs, rows = [], 0
    for _ in range(num_seqs):
        seq_len = draw(st.integers(1, 64))
        q_len = draw(st.integers(0, min(seq_len, 48 - rows)))
        seqs.append((q_len, seq_len))
        rows += q_len
    return seqs


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seqs=ragged_layouts(), chunk_size=st.sampled_from([None, C]),
       num_kv_splits=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_random_ragged_layouts(seqs, chunk_size, num_kv_splits, seed):
    # Fixed shapes, so every example reuses one of four compiled kernels.
    batch = make_batch(seqs, num_slots=8, num_rows=48, width=16, num_pages=8 * 16 + 4,
                       seed=seed)
    check(batch, chunk_size, block_q=8, pages_per_block=4, num_kv_splits=num_kv_splits)


def test_above_10k_tokens_chunk_8192():
    check_10k_tokens(interpret=True)


def check_10k_tokens(interpret: bool):
    """A 10,300-token prefill next to a decode at 8,193 and padding rows, with Llama 4's chunk
    size: the case that broke FA3 ("scheduler_metadata must have shape") in the CUDA engine.
    K/V go in through write_kv_pages; max_model_len 10,400 is not a multiple of 8192."""
    rng = np.random.default_rng(1)
    chunk, page_size, max_model_len = 8192, 16, 10_400
    heads, kv_heads, head_dim = 2, 1, 16
    width = -(-max_model_len // page_size)
    prefill, decode = 10_300, 8_193
    num_rows = prefill + 1 + 5
    num_pages = 2 * width + 3
    order = rng.permutation(num_pages)
    tables = np.stack([order[:width], order[width:2 * width], order[:width]]).astype(np.int32)

    # Rows: the prefill (positions 0..10299), the decode (position 8192), 5 padding rows.
    pos = np.concatenate([np.arange(prefill), [decode - 1], np.zeros(5, int)])
    owner = np.concatenate([np.zeros(prefill, int), [1], np.zeros(5, int)])
    slots = tables[owner, pos // page_size] * page_size + pos % page_size
    slots[prefill + 1:] = -1
    k = jnp.asarray(rng.standard_normal((num_rows, kv_heads, head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((num_rows, kv_heads, head_dim)), jnp.float32)
    empty = jnp.full((num_pages, page_size, kv_heads, head_dim), jnp.nan, jnp.float32)
    k_pages, v_pages = write_kv_pages(empty, empty, k, v, jnp.asarray(slots, jnp.int32))
    # The decode's earlier keys (its own cache): finite values in its pages.
    decode_pages = tables[1, :-(-decode // page_size)]
    prior = jnp.asarray(rng.standard_normal((len(decode_pages), page_size, kv_heads,
                                             head_dim)), jnp.float32)
    unwritten = ~jnp.isfinite(k_pages[decode_pages])
    k_pages = k_pages.at[decode_pages].set(jnp.where(unwritten, prior, k_pages[decode_pages]))
    v_pages = v_pages.at[decode_pages].set(jnp.where(unwritten, prior, v_pages[decode_pages]))

    q = jnp.asarray(rng.standard_normal((num_rows, heads, head_dim)), jnp.float32)
    batch = Batch(q, k_pages, v_pages, jnp.asarray(tables),
                  jnp.array([prefill, decode, 0], jnp.int32),
                  jnp.array([0, prefill, prefill + 1, prefill + 1], jnp.int32), jnp.int32(2))
    out = ragged_paged_attention(*batch.args, chunk_size=chunk, block_q=64, pages_per_block=8,
                                 interpret=interpret)
    got = np.asarray(out)
    assert np.all(np.isfinite(got)) and not np.any(got[prefill + 1:])

    # The prefill rows against the dense kernel on the same keys.
    dense = flash_attention(q[None, :prefill], k[None, :prefill], v[None, :prefill],
                            chunk_size=chunk, block_q=128, block_k=128, interpret=interpret)
    np.testing.assert_allclose(got[:prefill], np.asarray(dense[0]), atol=1e-5, rtol=1e-5)
    # Rows around the chunk boundary, the last rows, and the decode against numpy.
    for row in [0, 8191, 8192, 8193, prefill - 1, prefill]:
        seq = owner[row]
        first = pos[row] // chunk * chunk
        cols = np.arange(first, pos[row] + 1)
        kk = np.asarray(k_pages)[tables[seq, cols // page_size], cols % page_size, 0]
        vv = np.asarray(v_pages)[tables[seq, cols // page_size], cols % page_size, 0]
        for h in range(heads):
            s = kk @ np.asarray(q[row, h], np.float64) * head_dim**-0.5
            w = np.exp(s - s.max())
            np.testing.assert_allclose(got[row, h], w @ vv / w.sum(), atol=1e-5, rtol=1e-5)


def test_compiler_params_reach_pallas_call(compiler_params_seen):
    """Interpret mode ignores compiler params, so check the pallas_call arguments directly."""
    batch = make_batch([(2, 5)], heads=2, kv_heads=1)
    ragged_paged_attention(*batch.args, block_q=8, pages_per_block=4, num_warps=8,
                           num_stages=1, interpret=True)
    [params] = compiler_params_seen
    assert isinstance(params, plgpu.CompilerParams)
    assert (params.num_warps, params.num_stages) == (8, 1)


def test_lowers_to_triton_for_cuda(monkeypatch):
    """The real Triton lowering at Llama 4 Scout shapes (40 q / 8 kv heads, head_dim 128,
    16-token pages): 5 q heads per kv head padded to 8, times block_q 8 = 64 kernel rows."""
    num_rows, num_slots, width = 64, 8, 32
    q = jnp.zeros((num_rows, 40, 128), jnp.bfloat16)
    pages = jnp.zeros((200, 16, 8, 128), jnp.bfloat16)
    tables = jnp.zeros((num_slots, width), jnp.int32)
    lens = jnp.zeros((num_slots,), jnp.int32)
    starts = jnp.zeros((num_slots + 1,), jnp.int32)
    ttir, text = lower_for_cuda(
        monkeypatch,
        lambda *a: ragged_paged_attention(*a, chunk_size=8192, num_kv_splits=2, num_warps=4,
                                          num_stages=3),
        q, pages, pages, tables, lens, starts, jnp.int32(1))
    check_triton_ir(ttir)
    assert "tensor<64x128xbf16> * tensor<128x64xbf16>" in ttir  # 64 rows x 4 pages of keys
    if "__gpu$xla.gpu.triton" in text:  # jaxlib 0.10 keeps the launch config readable
        assert re.search(r"num_stages = 3 : i32, num_warps = 4 : i32", text)
        # Tiles: min(rows, cdiv(rows, block_q=8) + slots) = 16; 40 q heads; 2 splits.
        assert re.search(r"grid_x = 16 : i32, grid_y = 40 : i32, grid_z = 2 : i32", text)


GPU_LAYOUTS = {
    "chunk_edges": dict(seqs=CHUNK_EDGES, width=16, num_slots=15, num_rows=128),
    "max_model_len_42": dict(seqs=[(1, 42), (10, 42), (1, 41), (9, 40), (1, 33)], width=11),
    "gqa8": dict(seqs=[(1, 17), (17, 17), (15, 33), (1, 1)], heads=16, kv_heads=2, width=12),
}


@pytest.mark.gpu
@pytest.mark.parametrize("layout", list(GPU_LAYOUTS))
@pytest.mark.parametrize("num_kv_splits", [1, 4])
def test_gpu_matches_reference_f32(layout, num_kv_splits):
    batch = make_batch(**GPU_LAYOUTS[layout])
    check(batch, C, interpret=False, block_q=8, pages_per_block=4, num_kv_splits=num_kv_splits)


@pytest.mark.gpu
def test_gpu_above_10k_tokens_chunk_8192():
    check_10k_tokens(interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_size", [None, 256])
def test_gpu_bf16_scout_shapes(chunk_size):
    seqs = [(1, 700), (1, 1), (300, 600), (1, 257), (129, 129), (1, 1000)]
    batch = make_batch(seqs, heads=40, kv_heads=8, head_dim=128, page_size=16, width=64,
                       dtype=jnp.bfloat16)
    check(batch, chunk_size, atol=2e-2, interpret=False)


@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("q_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, C])
def test_fp8_cache_is_read_by_every_impl(q_dtype, chunk_size, interpret):
    """An e4m3 cache (``--kv-cache-dtype fp8``): the Triton kernel and the blockwise XLA
    attention read it as the naive numpy attention reads the same values widened to f32."""
    from pallas_kernels.xla.ragged_paged_attention import ragged_paged_attention_blockwise

    batch = make_batch(CHUNK_EDGES, width=16, dtype=jnp.float32)
    fp8 = dataclasses.replace(batch, q=batch.q.astype(q_dtype),
                              k_pages=batch.k_pages.astype(jnp.float8_e4m3fn),
                              v_pages=batch.v_pages.astype(jnp.float8_e4m3fn))
    widened = dataclasses.replace(batch, q=fp8.q.astype(jnp.float32),
                                  k_pages=fp8.k_pages.astype(jnp.float32),
                                  v_pages=fp8.v_pages.astype(jnp.float32))
    want = naive_attention(widened, chunk_size)
    tol = 1e-5 if q_dtype == jnp.float32 else 2e-2
    padding = int(batch.query_start_loc[int(batch.num_seqs)])
    for fn in (functools.partial(ragged_paged_attention, interpret=interpret),
               ragged_paged_attention_blockwise, ragged_paged_attention_reference):
        out = fn(*fp8.args, chunk_size=chunk_size)
        assert out.dtype == q_dtype
        got = np.asarray(out, np.float32)
        np.testing.assert_allclose(got[:padding], want[:padding], atol=tol, rtol=tol)
    # and e4m3 really is coarser than the f32 cache
    assert np.abs(want - naive_attention(batch, chunk_size))[:padding].max() > 1e-3


def test_fp8_pages_saturate_instead_of_nan():
    pages = jnp.zeros((2, 4, 1, 2), jnp.float8_e4m3fn)
    new = jnp.asarray([[[1000.0, -1000.0]], [[3.0, -0.5]]], jnp.float32)
    k, _ = write_kv_pages(pages, pages, new, new, jnp.asarray([1, 5]))
    assert np.asarray(k.astype(jnp.float32)).reshape(8, 2)[[1, 5]].tolist() == [
        [448.0, -448.0], [3.0, -0.5]]
