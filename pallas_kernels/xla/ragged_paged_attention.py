"""Ragged paged attention in plain jnp, blockwise: online softmax over KV blocks of the cache.

Same signature and semantics as ``pallas_kernels.reference.ragged_paged_attention``. The
reference gathers every key of every sequence for every query row, ``[N, W * p, K, d]``:
memory O(N * max_model_len). Here each query row walks its own visible key range, one block
of ``pages_per_block`` pages at a time, so memory is O(N * block) whatever the context length:

- row n at position ``pos`` sees keys ``[lo, pos]``, where ``lo`` is the start of its chunk
  (chunked local attention) or 0; blocks before ``lo`` are never read (the kernels' block
  skipping, per row);
- block i of row n holds the pages ``lo // p + i * B .. + B - 1`` of its block table, read
  with the column clipped to the table width and the page id clipped to the cache;
- keys outside ``[lo, pos]`` are zeroed before the dot (unowned pages may hold NaN, and
  0 * NaN = NaN) and masked to -inf after it.

The loop runs as many blocks as the longest row needs; shorter rows mask their extra blocks.
Glossary as in the reference: N rows, H q heads, K kv heads, d head dim, P pages, p page size,
S sequence slots, W table width, B pages per block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.reference.ragged_paged_attention import query_row_layout

DEFAULT_BLOCK_TOKENS = 256  # keys per block: a few MB per step at the tiny models' shapes


@functools.partial(jax.jit, static_argnames=("chunk_size", "sm_scale", "pages_per_block"))
def ragged_paged_attention_blockwise(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    seq_lens: jax.Array,
    query_start_loc: jax.Array,
    num_seqs: jax.Array,
    *,
    chunk_size: int | None = None,
    sm_scale: float | None = None,
    pages_per_block: int | None = None,
) -> jax.Array:
    """Attention of the flat query rows ``q [N, H, d]`` over the paged cache (module doc)."""
    num_rows, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    width = block_tables.shape[1]
    group = num_heads // num_kv_heads
    block = pages_per_block or max(1, DEFAULT_BLOCK_TOKENS // page_size)
    scale = head_dim**-0.5 if sm_scale is None else sm_scale

    seq, pos, is_real = query_row_layout(query_start_loc, seq_lens, num_seqs, num_rows)
    pos = jnp.where(is_real, pos, 0)
    lo = jnp.zeros_like(pos) if chunk_size is None else pos - pos % chunk_size
    first_page = lo // page_size
    blocks_needed = jnp.where(is_real, (pos // page_size - first_page) // block + 1, 0)
    qg = q.astype(jnp.float32).reshape(num_rows, num_kv_heads, group, head_dim) * scale
    offsets = jnp.arange(block * page_size, dtype=jnp.int32)  # key offsets inside a block

    def body(i, carry):
        acc, row_max, denom = carry
        start = (first_page + i * block) * page_size  # [N] first key of this block
        keys = start[:, None] + offsets[None, :]  # [N, B * p]
        col = jnp.minimum(keys // page_size, width - 1)
        page = jnp.clip(block_tables[seq[:, None], col], 0, num_pages - 1)
        visible = (keys >= lo[:, None]) & (keys <= pos[:, None]) & is_real[:, None]

        def read(pages):  # [N, B * p, K, d], zero where not visible
            kv = pages[page, keys % page_size].astype(jnp.float32)
            return jnp.where(visible[:, :, None, None], kv, 0.0)

        k, v = read(k_pages), read(v_pages)
        scores = jnp.einsum("NKgd,NLKd->NKgL", qg, k)
        scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
        new_max = jnp.maximum(row_max, scores.max(axis=-1))
        safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        probs = jnp.exp(scores - safe_max[..., None])
        rescale = jnp.exp(row_max - safe_max)
        acc = acc * rescale[..., None] + jnp.einsum("NKgL,NLKd->NKgd", probs, v)
        return acc, new_max, denom * rescale + probs.sum(axis=-1)

    carry = (jnp.zeros((num_rows, num_kv_heads, group, head_dim), jnp.float32),
             jnp.full((num_rows, num_kv_heads, group), -jnp.inf, jnp.float32),
             jnp.zeros((num_rows, num_kv_heads, group), jnp.float32))
    acc, _, denom = lax.fori_loop(0, jnp.max(blocks_needed), body, carry)
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out.reshape(num_rows, num_heads, head_dim).astype(q.dtype)
