"""Ragged paged attention over a paged KV cache, written from its definition in jnp.

Glossary: N flat query rows, H query heads, K kv heads (H % K == 0), d head dim, P pages,
p page size, S sequence slots, W block-table width (pages per sequence), L = W * p.

Sequence s < num_seqs owns query rows ``query_start_loc[s]:query_start_loc[s + 1]`` at
positions ``seq_lens[s] - q_len .. seq_lens[s] - 1``; its key at position j lives in page
``block_tables[s, j // p]``, slot ``j % p``. Attention is causal, and with ``chunk_size`` C a
key j is visible to a query at position i only when ``j // C == i // C`` (Llama 4 chunked
local attention). Rows past ``query_start_loc[num_seqs]`` are padding and return zeros.

Every kernel of this op (``pallas_kernels.triton.ragged_paged_attention``) has the signature
of ``ragged_paged_attention_reference`` and is tested against it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The definition in float32: on a GPU the default precision would multiply in TF32.
HIGHEST = jax.lax.Precision.HIGHEST


def query_row_layout(
    query_start_loc: jax.Array, seq_lens: jax.Array, num_seqs: jax.Array, num_rows: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """For each flat query row: (owning sequence, absolute position, is a real row).

    The owner is counted rather than binary-searched, so entries of ``query_start_loc`` past
    ``num_seqs`` may hold anything.
    """
    num_slots = seq_lens.shape[0]
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    live = jnp.arange(num_slots) < num_seqs
    started = (query_start_loc[1:][None, :] <= rows[:, None]) & live[None, :]
    seq = jnp.minimum(jnp.sum(started, axis=1), num_slots - 1).astype(jnp.int32)
    is_real = rows < query_start_loc[num_seqs]
    q_len = query_start_loc[seq + 1] - query_start_loc[seq]
    pos = seq_lens[seq] - q_len + (rows - query_start_loc[seq])
    return seq, pos.astype(jnp.int32), is_real


def ragged_paged_attention_reference(
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
) -> jax.Array:
    """Attention written from the definition (see module docstring); float32 math."""
    num_rows, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_slots, width = block_tables.shape
    group = num_heads // num_kv_heads
    seq_len_max = width * page_size
    scale = head_dim**-0.5 if sm_scale is None else sm_scale

    seq, pos, is_real = query_row_layout(query_start_loc, seq_lens, num_seqs, num_rows)

    # Keys of every sequence in position order; slots at or past seq_len are zeroed so that
    # stale or NaN pages cannot leak through 0 * NaN.
    key_pos = jnp.arange(seq_len_max, dtype=jnp.int32)
    owned = key_pos[None, :] < seq_lens[:, None]  # [S, L]

    def gather(pages: jax.Array) -> jax.Array:
        per_seq = pages[block_tables].reshape(num_slots, seq_len_max, num_kv_heads, head_dim)
        return jnp.where(owned[:, :, None, None], per_seq.astype(jnp.float32), 0.0)

    k_rows, v_rows = gather(k_pages)[seq], gather(v_pages)[seq]  # [N, L, K, d]

    visible = (key_pos[None, :] <= pos[:, None]) & is_real[:, None]
    if chunk_size is not None:
        visible &= (key_pos[None, :] // chunk_size) == (pos[:, None] // chunk_size)

    qg = q.astype(jnp.float32).reshape(num_rows, num_kv_heads, group, head_dim)
    scores = jnp.einsum("NKgd,NLKd->NKgL", qg, k_rows, precision=HIGHEST) * scale
    mask = visible[:, None, None, :]
    scores = jnp.where(mask, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(mask.any(-1, keepdims=True), row_max, 0.0)
    probs = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    out = jnp.einsum("NKgL,NLKd->NKgd", probs, v_rows, precision=HIGHEST)
    out = out / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(num_rows, num_heads, head_dim).astype(q.dtype)
