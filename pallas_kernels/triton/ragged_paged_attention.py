"""Ragged paged attention: the Triton-style Pallas kernel of
``pallas_kernels.reference.ragged_paged_attention`` (decode and chunked prefill in one call).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.triton.common import (
    LN_2,
    LOG2_E,
    check_block_size,
    chunk_start,
    dot,
    kv_block_ranges,
    next_power_of_2,
    online_softmax_step,
    padded_head_dim,
    triton_compiler_params,
)


def _tile_metadata(
    query_start_loc: jax.Array,
    seq_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    num_tiles: int,
    block_q: int,
    group_pad: int,
    num_heads: int,
    num_kv_heads: int,
    max_kv_len: int,
) -> jax.Array:
    """``[num_tiles, 6]`` int32: per query tile its sequence, first flat row, number of
    tokens (0 for unused tiles), first position, kv length, and layout (1: per head).

    A tile has ``block_q * group_pad`` kernel rows. Grouped tiles hold ``block_q`` tokens
    times the q heads of one kv head (GQA groups padded to ``group_pad``); per-head tiles
    hold ``block_q * group_pad`` tokens of one q head, unpadded. A sequence takes the layout
    that reads its K/V fewer times (per-head tiles for prefills of more than a few tokens,
    grouped tiles for decode). Derived from the same arrays the kernel call gets, so it
    always matches the call.
    """
    num_slots = seq_lens.shape[0]
    rows_per_tile = block_q * group_pad
    live = jnp.arange(num_slots) < num_seqs
    q_lens = jnp.where(live, jnp.maximum(query_start_loc[1:] - query_start_loc[:-1], 0), 0)
    grouped_tiles = (q_lens + block_q - 1) // block_q
    head_tiles = (q_lens + rows_per_tile - 1) // rows_per_tile
    per_head = head_tiles * num_heads < grouped_tiles * num_kv_heads
    tokens = jnp.where(per_head, rows_per_tile, block_q)
    tiles = jnp.where(per_head, head_tiles, grouped_tiles)
    tile_end = jnp.cumsum(tiles)
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(tile_end, t, side="right"), num_slots - 1)
    local = t - (tile_end[seq] - tiles[seq])
    first = local * tokens[seq]
    ntok = jnp.where(t < tile_end[-1], jnp.clip(q_lens[seq] - first, 0, tokens[seq]), 0)
    row0 = query_start_loc[seq] + first
    pos0 = seq_lens[seq] - q_lens[seq] + first
    kv_len = jnp.clip(seq_lens[seq], 0, max_kv_len)
    return jnp.stack([seq, row0, ntok, pos0, kv_len, per_head[seq]], axis=1).astype(jnp.int32)


def _and_cols(rows_ok: jax.Array, cols_ok: jax.Array | None) -> jax.Array:
    return rows_ok[:, None] if cols_ok is None else rows_ok[:, None] & cols_ok[None, :]


def _ragged_kernel(
    meta_ref, bt_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
    *, chunk_size: int | None, group: int, group_pad: int, head_dim: int, dim: int,
    qk_scale: float, block_q: int, block_k: int, page_size: int, num_splits: int,
):
    tile, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_rows, num_kv_slots, width = q_ref.shape[0], k_ref.shape[0], bt_ref.shape[1]
    num_kv_heads = k_ref.shape[1]
    seq, row0, nrows, pos0, kv_len, per_head = (meta_ref[tile, i] for i in range(6))
    per_head = per_head > 0

    # Grouped tile: row m is token m // group_pad, q head member m % group_pad of kv head
    # ``head`` (programs with head >= K have nothing to do). Per-head tile: row m is token m
    # of q head ``head``.
    m = jnp.arange(block_q * group_pad, dtype=jnp.int32)
    member = lax.rem(m, jnp.int32(group_pad))
    tok = jnp.where(per_head, m, lax.div(m, jnp.int32(group_pad)))
    kv_head = jnp.where(per_head, lax.div(head, jnp.int32(group)),
                        jnp.minimum(head, num_kv_heads - 1))
    nrows = jnp.where(per_head | (head < num_kv_heads), nrows, 0)
    heads = jnp.where(per_head, head, kv_head * group + jnp.minimum(member, group - 1))
    rows = row0 + tok
    row_ok = (tok < nrows) & (per_head | (member < group)) & (rows < num_rows)
    pos = pos0 + tok
    # A plain arange keeps the column index visibly contiguous, so Triton vectorizes the
    # loads (cp.async); clipping it, needed only for a padded head dim, hides that.
    cols = jnp.arange(dim, dtype=jnp.int32)
    cols_ok = None
    if dim != head_dim:
        cols_ok = cols < head_dim
        cols = jnp.minimum(cols, head_dim - 1)

    q_mask = jnp.broadcast_to(_and_cols(row_ok, cols_ok), (m.shape[0], dim))
    q_rows = jnp.clip(rows, 0, num_rows - 1)
    q = plgpu.load(q_ref.at[q_rows[:, None], heads[:, None], cols[None, :]], mask=q_mask,
                   other=0)

    # Keys [k_lo, k_hi] may be visible to some row, [full_lo, full_hi] to every row.
    pos_last = pos0 + nrows - 1
    k_lo, full_lo = jnp.int32(0), jnp.int32(0)
    if chunk_size is not None:
        k_lo, full_lo = chunk_start(pos0, chunk_size), chunk_start(pos_last, chunk_size)
    k_hi = jnp.where(nrows > 0, jnp.minimum(pos_last, kv_len - 1), -1)
    full_hi = jnp.minimum(pos0, kv_len - 1)
    first, full_first, full_end, end = kv_block_ranges(k_lo, k_hi, full_lo, full_hi, block_k)

    # This program's share of the tile's KV blocks.
    per_split = lax.div(end - first + num_splits - 1, jnp.int32(num_splits))
    lo = jnp.minimum(first + split * per_split, end)
    hi = jnp.minimum(lo + per_split, end)
    full_first, full_end = jnp.clip(full_first, lo, hi), jnp.clip(full_end, lo, hi)

    def load_kv(kb, masked: bool):
        keys = kb * block_k + jnp.arange(block_k, dtype=jnp.int32)
        # The block-table column is clipped to the table width: a partial last chunk must
        # never read past ceil(max_model_len / page_size) columns.
        table_cols = jnp.minimum(lax.div(keys, jnp.int32(page_size)), width - 1)
        key_ok = keys < kv_len
        if masked:
            pages = plgpu.load(bt_ref.at[seq, table_cols], mask=key_ok, other=0)
        else:
            pages = plgpu.load(bt_ref.at[seq, table_cols])
        # Masked keys read page 0; a corrupt table entry must not address past the cache.
        pages = jnp.clip(pages, 0, num_kv_slots // page_size - 1)
        slots = pages * page_size + lax.rem(keys, jnp.int32(page_size))
        index = (slots[:, None], kv_head, cols[None, :])
        # An fp8 cache (e4m3, unit scale) is widened to q's dtype in registers.
        if not masked and cols_ok is None:
            k, v = plgpu.load(k_ref.at[index]), plgpu.load(v_ref.at[index])
            return keys, k.astype(q.dtype), v.astype(q.dtype)
        # Unowned pages may hold NaN: zero K and V rows there (0 * NaN would be NaN).
        kv_mask = jnp.broadcast_to(
            _and_cols(key_ok if masked else jnp.ones_like(key_ok), cols_ok), (block_k, dim))
        # A float fill: Triton casts an integer splat to bf16 / f32 but not to e4m3.
        k = plgpu.load(k_ref.at[index], mask=kv_mask, other=0.0)
        v = plgpu.load(v_ref.at[index], mask=kv_mask, other=0.0)
        return keys, k.astype(q.dtype), v.astype(q.dtype)

    def masked_body(kb, carry):
        keys, k, v = load_kv(kb, masked=True)
        s = dot(q, k, trans_b=True) * qk_scale
        visible = row_ok[:, None] & (keys < kv_len)[None, :] & (keys[None, :] <= pos[:, None])
        if chunk_size is not None:
            c = jnp.int32(chunk_size)
            visible &= lax.div(keys, c)[None, :] == lax.div(jnp.maximum(pos, 0), c)[:, None]
        return online_softmax_step(carry, s, v, visible)

    def full_body(kb, carry):
        _, k, v = load_kv(kb, masked=False)
        s = dot(q, k, trans_b=True) * qk_scale
        return online_softmax_step(carry, s, v, None)

    carry = (
        jnp.zeros((m.shape[0], dim), jnp.float32),
        jnp.full(m.shape, -jnp.inf, jnp.float32),
        jnp.zeros(m.shape, jnp.float32),
    )
    carry = lax.fori_loop(lo, full_first, masked_body, carry)
    carry = lax.fori_loop(full_first, full_end, full_body, carry)
    acc, m_max, l_sum = lax.fori_loop(full_end, hi, masked_body, carry)

    seen = l_sum > 0
    out = jnp.where(seen[:, None], acc / jnp.where(seen, l_sum, 1.0)[:, None], 0.0)
    lse = jnp.where(seen, m_max * LN_2 + jnp.log(jnp.where(seen, l_sum, 1.0)), -jnp.inf)
    # Every masked-off element is pointed at the spare row num_rows, so that no masked
    # element aliases a real one (interpret mode writes masked elements back as they were).
    out_mask = jnp.broadcast_to(_and_cols(row_ok, cols_ok), out.shape)
    out_rows = jnp.where(out_mask, rows[:, None], num_rows)
    plgpu.store(o_ref.at[split, out_rows, heads[:, None], cols[None, :]], out, mask=out_mask)
    plgpu.store(lse_ref.at[split, jnp.where(row_ok, rows, num_rows), heads], lse, mask=row_ok)


MAX_KV_SPLITS = 64


def default_num_kv_splits(num_tiles: int, num_kv_heads: int, target_programs: int = 1024) -> int:
    """Enough KV splits (at most ``MAX_KV_SPLITS``) that a small batch still fills the GPU:
    one long decode gets 8 kv heads x 64 splits = 512 programs, about 4 per SM of an H100's
    132; large batches get one split and skip the merge."""
    return max(1, min(MAX_KV_SPLITS, target_programs // (num_tiles * num_kv_heads)))


@functools.partial(
    jax.jit,
    static_argnames=("chunk_size", "sm_scale", "block_q", "pages_per_block", "num_kv_splits",
                     "num_warps", "num_stages", "interpret"),
)
def ragged_paged_attention(
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
    block_q: int | None = None,
    pages_per_block: int | None = None,
    num_kv_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """The Pallas (Triton) kernel for ``ragged_paged_attention_reference``; same semantics.

    The flat query rows are cut into tiles of ``R = block_q * next_pow2(H // K)`` kernel
    rows, over KV blocks of ``pages_per_block`` pages. Decode-like sequences use grouped
    tiles: ``block_q`` tokens for all ``H // K`` q heads of one kv head, so K/V are read
    once per kv head. Prefills use per-head tiles: ``R`` tokens of one q head (no GQA
    padding, K/V read once per ``R`` tokens); see ``_tile_metadata``. The grid is (tiles,
    q heads, ``num_kv_splits``); each split covers an equal share of the tile's visible KV
    blocks and the splits are merged by log-sum-exp, so one long decode still fills the
    GPU. Defaults: 64 kernel rows, 64 keys per block, splits from the grid size.
    """
    num_rows, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, kdim = k_pages.shape
    num_slots, width = block_tables.shape
    if k_pages.shape != v_pages.shape or kdim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {q.shape}, k_pages {k_pages.shape}, v_pages {v_pages.shape}: "
                         "expected q [N,H,d], pages [P,p,K,d] with H a multiple of K")
    if seq_lens.shape != (num_slots,) or query_start_loc.shape != (num_slots + 1,):
        raise ValueError(f"seq_lens {seq_lens.shape} / query_start_loc {query_start_loc.shape}"
                         f" do not match block_tables {block_tables.shape}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size}: must be positive")
    group = num_heads // num_kv_heads
    group_pad = next_power_of_2(group)
    block_q = max(1, 64 // group_pad) if block_q is None else block_q
    pages_per_block = max(1, 64 // page_size) if pages_per_block is None else pages_per_block
    block_k = pages_per_block * page_size
    check_block_size("block_q * next_power_of_2(H // K)", block_q * group_pad)
    check_block_size("pages_per_block * page_size", block_k)
    num_tiles = min(num_rows, pl.cdiv(num_rows, block_q) + num_slots)
    if num_kv_splits is None:
        num_kv_splits = default_num_kv_splits(num_tiles, num_kv_heads)
    if num_kv_splits < 1:
        raise ValueError(f"num_kv_splits={num_kv_splits}: must be >= 1")
    scale = head_dim**-0.5 if sm_scale is None else sm_scale

    meta = _tile_metadata(query_start_loc.astype(jnp.int32), seq_lens.astype(jnp.int32),
                          num_seqs, num_tiles=num_tiles, block_q=block_q, group_pad=group_pad,
                          num_heads=num_heads, num_kv_heads=num_kv_heads,
                          max_kv_len=width * page_size)
    kernel = functools.partial(
        _ragged_kernel, chunk_size=chunk_size, group=group, group_pad=group_pad,
        head_dim=head_dim, dim=padded_head_dim(head_dim), qk_scale=scale * LOG2_E,
        block_q=block_q, block_k=block_k, page_size=page_size, num_splits=num_kv_splits,
    )
    # One spare row (index num_rows) takes the masked-off stores.
    out_parts, lse_parts = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((num_kv_splits, num_rows + 1, num_heads, head_dim),
                                 jnp.float32),
            jax.ShapeDtypeStruct((num_kv_splits, num_rows + 1, num_heads), jnp.float32),
        ),
        # Axis 1 runs the q heads when per-head tiles can occur, else the kv heads.
        grid=(num_tiles, num_heads if group > 1 else num_kv_heads, num_kv_splits),
        compiler_params=triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(
        meta,
        block_tables.astype(jnp.int32),
        q,
        k_pages.reshape(num_pages * page_size, num_kv_heads, head_dim),
        v_pages.reshape(num_pages * page_size, num_kv_heads, head_dim),
    )
    out_parts, lse_parts = out_parts[:, :num_rows], lse_parts[:, :num_rows]
    if num_kv_splits == 1:
        out = out_parts[0]
    else:
        lse_max = jnp.max(lse_parts, axis=0)
        weights = jnp.exp(lse_parts - jnp.where(jnp.isfinite(lse_max), lse_max, 0.0))
        total = jnp.sum(weights, axis=0)
        out = jnp.sum(weights[..., None] * out_parts, axis=0)
        out = out / jnp.where(total > 0, total, 1.0)[..., None]
    is_real = jnp.arange(num_rows) < query_start_loc[num_seqs]
    return jnp.where(is_real[:, None, None], out, 0.0).astype(q.dtype)
