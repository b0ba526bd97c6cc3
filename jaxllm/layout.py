"""The one host -> device contract: where every flat row of a step lives, and its checks.

Every index the device sees (positions, cache slots, page ids, block tables, row ranges) is
built here, by the host-side step builder (the engine and ``Model.logits``) or by the in-jit
layouts of ``generate()``, from one slot rule and one page count, and checked before it leaves.

Glossary: T flat rows, S sequence slots, W block-table width (pages per sequence), p page
size, B batch, G layer groups (``jaxllm.kv_cache.LayerGroups``: each has its own block
table; a chunked group's table holds ``NULL_PAGE`` where its chunk no longer reaches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kv_cache import NULL_PAGE, CacheConfig

ArrayLike = np.ndarray | jax.Array


class AttentionMetadata(NamedTuple):
    """Where each flat row lives; shapes are static per compiled program (masks carry raggedness).

    positions [T]: absolute position of row t in its sequence (0 for padding rows).
    slot_mapping [G, T]: flat cache slot (``slot_of``) written by row t in each layer group,
        -1 for padding.
    block_tables [G, S, W]: pages of each sequence slot in each group, in position order.
    seq_lens [S]: tokens of each sequence after this step (cached + new).
    query_start_loc [S + 1]: rows of sequence s are query_start_loc[s]:query_start_loc[s + 1].
    num_seqs []: live sequence slots; rows past query_start_loc[num_seqs] are padding.

    The rows of sequence s are its last ``q_len`` positions, so ``positions`` equals
    ``seq_lens[s] - q_len + i`` for its row i: the kernels rely on that, and the layout
    tests check every builder keeps it.
    """

    positions: jax.Array
    slot_mapping: jax.Array
    block_tables: jax.Array
    seq_lens: jax.Array
    query_start_loc: jax.Array
    num_seqs: jax.Array

    def for_group(self, group: int) -> AttentionMetadata:
        """The metadata one layer sees: its group's slots and block tables."""
        return self._replace(slot_mapping=self.slot_mapping[group],
                             block_tables=self.block_tables[group])


def check_token_ids(token_ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    """Returns the ids as int32, or raises ValueError naming the first id outside the vocab.

    Called once, where ids enter (a request's admission, ``generate()``, ``Model.logits``).
    """
    ids = np.asarray(token_ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        # An id past int64 makes an object array: name the first bad value, not the dtype.
        for x in ids.ravel().tolist():
            if not isinstance(x, int) or isinstance(x, bool):
                raise ValueError(f"token ids must be integers, got {x!r:.80}")
            if not 0 <= x < vocab_size:
                raise ValueError(f"Token id {x} is out of vocabulary (vocab_size={vocab_size})")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        first = ids[bad].flat[0]
        raise ValueError(f"Token id {int(first)} is out of vocabulary (vocab_size={vocab_size})")
    return ids.astype(np.int32)


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages that hold ``num_tokens`` tokens (the one ceiling division)."""
    return -(-num_tokens // page_size)


def slot_of(block_tables: ArrayLike, positions: ArrayLike, page_size: int) -> ArrayLike:
    """The slot rule: position j of a sequence lives in flat cache slot
    ``block_tables[..., j // p] * p + j % p``.

    ``block_tables [..., W]`` and ``positions [..., n]`` share their leading dims; numpy in,
    numpy out (host builders), jax in, jax out (in-jit layouts).
    """
    xp = jnp if isinstance(block_tables, jax.Array) or isinstance(positions, jax.Array) else np
    pages = xp.take_along_axis(block_tables, positions // page_size, axis=-1)
    return pages * page_size + positions % page_size


def first_needed_page(num_cached: int, page_size: int, chunk_size: int | None) -> int:
    """The first page a group must still hold when rows from position ``num_cached`` on run:
    0 for a global group, the page of the current chunk's start for a chunked one."""
    if chunk_size is None:
        return 0
    return num_cached // chunk_size * chunk_size // page_size


@dataclasses.dataclass(frozen=True)
class SeqPiece:
    """The next tokens of one sequence that a step runs (a prefill piece, or a decode row):
    ``num_cached`` tokens are already in its pages."""

    pages: Sequence[Sequence[int]]  # per layer group: pages in position order (table row)
    num_cached: int
    tokens: Sequence[int]


@dataclasses.dataclass(frozen=True)
class StepBatch:
    tokens: np.ndarray  # [T] int32
    meta: AttentionMetadata  # numpy arrays
    logits_rows: np.ndarray  # [S] row of each sequence's last token (0 for padding slots)
    num_seqs: int


def build_step(pieces: Sequence[SeqPiece], cache: CacheConfig, *, width: int, num_rows: int,
               num_slots: int, group_chunk: Sequence[int | None] = (None,),
               tables: np.ndarray | None = None) -> StepBatch:
    """Flat-batch arrays for ``pieces``, padded to ``num_rows`` rows and ``num_slots``
    sequence slots with block tables ``width`` pages wide, one per layer group (whose chunk
    sizes are ``group_chunk``); every index is checked (``lay_out_step``). ``tables [G,
    num_slots, width]``: the pieces' block tables already laid out, else each piece's pages
    are copied in. Token ids were checked at admission.
    """
    if not pieces:
        raise ValueError("a step needs at least one sequence")
    groups, live = len(group_chunk), len(pieces)
    if live > num_slots:
        raise ValueError(f"{live} sequences do not fit a step of {num_slots} sequence slots")
    laid_out = tables is not None
    if tables is None:
        tables = np.full((groups, num_slots, width), NULL_PAGE, np.int32)
    elif tables.shape != (groups, num_slots, width):
        raise ValueError(f"block tables of shape {tables.shape}, the step needs "
                         f"{(groups, num_slots, width)}")
    held = np.zeros((groups, live), np.int64)  # pages in each table row
    for s, c in enumerate(pieces):
        if len(c.pages) != groups:
            raise ValueError(f"sequence {s}: pages for {len(c.pages)} layer groups, the cache "
                             f"has {groups}")
        for g, pages in enumerate(c.pages):
            n = len(pages)
            if n > width:
                raise ValueError(f"sequence {s}: {n} pages, at most {width} pages per "
                                 "sequence")
            if not laid_out:
                tables[g, s, :n] = pages
            held[g, s] = n
    lengths = np.fromiter((len(c.tokens) for c in pieces), np.int64, live)
    tokens = [t for c in pieces for t in c.tokens]
    cached = np.fromiter((c.num_cached for c in pieces), np.int64, live)
    return lay_out_step(tokens, lengths, cached, held, tables, cache, num_rows=num_rows,
                        group_chunk=group_chunk)


def lay_out_step(tokens: Sequence[int] | np.ndarray, lengths: np.ndarray, cached: np.ndarray,
                 held: np.ndarray, tables: np.ndarray, cache: CacheConfig, *, num_rows: int,
                 group_chunk: Sequence[int | None] = (None,)) -> StepBatch:
    """The step's arrays from whole-step columns, checked with array operations before any
    device work: sequence s runs ``lengths[s]`` new tokens after ``cached[s]`` cached ones,
    its tokens back to back in ``tokens``; ``tables [G, S, W]`` are the sequence slots' block
    tables (padded slots past ``len(lengths)``), ``held [G, live]`` the pages each live row
    holds (``NULL_PAGE`` past them)."""
    groups, page, live = len(group_chunk), cache.page_size, len(lengths)
    num_slots, width = tables.shape[1], tables.shape[2]
    if live == 0:
        raise ValueError("a step needs at least one sequence")
    rows = int(lengths.sum())
    if rows > num_rows or live > num_slots:
        raise ValueError(f"{rows} rows of {live} sequences do not fit a step of "
                         f"{num_rows} rows and {num_slots} sequence slots")
    if tables.shape[0] != groups:
        raise ValueError(f"block tables for {tables.shape[0]} layer groups, the cache has "
                         f"{groups}")
    if (bad := np.flatnonzero((lengths < 1) | (cached < 0))).size:
        raise ValueError(f"sequence {bad[0]}: needs >= 1 new token and num_cached >= 0")
    if (bad := np.flatnonzero(held.max(axis=0) > width)).size:
        raise ValueError(f"sequence {bad[0]}: {held[:, bad[0]].max()} pages, at most {width} "
                         "pages per sequence")
    ends = cached + lengths
    _check_tables(tables[:, :live], held, cached, ends, cache, width, group_chunk)
    flat = np.zeros(num_rows, np.int32)
    flat[:rows] = tokens
    starts = np.zeros(num_slots + 1, np.int32)
    starts[1 : live + 1] = np.cumsum(lengths)
    starts[live + 1 :] = rows
    seq_of_row = np.repeat(np.arange(live), lengths)
    positions = np.zeros(num_rows, np.int32)
    positions[:rows] = np.arange(rows) - starts[seq_of_row] + cached[seq_of_row]
    slots = np.full((groups, num_rows), -1, np.int32)
    pos = positions[:rows]
    slots[:, :rows] = tables[:, seq_of_row, pos // page] * page + pos % page  # ``slot_of``
    seq_lens = np.zeros(num_slots, np.int32)
    seq_lens[:live] = ends
    last = np.zeros(num_slots, np.int32)
    last[:live] = starts[1 : live + 1] - 1
    meta = AttentionMetadata(positions=positions, slot_mapping=slots, block_tables=tables,
                             seq_lens=seq_lens, query_start_loc=starts,
                             num_seqs=np.int32(live))
    return StepBatch(flat, meta, last, live)


def _check_tables(tables: np.ndarray, held: np.ndarray, cached: np.ndarray, ends: np.ndarray,
                  cache: CacheConfig, width: int, group_chunk: Sequence[int | None]) -> None:
    """Every live table row holds the pages its positions need, with ids in range, and no
    dropped (null) page where its group's attention still reads (``tables [G, S, W]``,
    ``held [G, S]`` pages per row; positions ``cached..ends - 1``)."""
    page = cache.page_size
    need = -(-ends // page)  # ``pages_for``
    # Whole-step operations over every group at once (a handful of numpy calls per step),
    # over the columns some row holds or needs: a table is ``max_model_len / page`` wide
    # (62,500 columns at 1M tokens) and past its pages a row is ``NULL_PAGE``.
    width = int(max(held.max(), need.max()))
    tables = tables[:, :, :width]
    if (short := np.argwhere(held < need)).size:
        g, s = short[0]
        raise ValueError(f"sequence {s}: {held[g, s]} pages for {ends[s]} tokens (page "
                         f"size {page}, at most {width} pages per sequence)")
    if tables.min() < 0 or tables.max() > cache.num_pages:
        g, s = np.argwhere((tables.min(axis=2) < 0) | (tables.max(axis=2) > cache.num_pages))[0]
        raise ValueError(f"sequence {s}: page ids must be in [0, {cache.num_pages}], got "
                         f"{tables[g, s].min()}..{tables[g, s].max()}")
    chunks = np.array([c or 0 for c in group_chunk], np.int64)[:, None]  # 0: a global group
    every = np.maximum(chunks, 1)
    first = np.where(chunks > 0, cached[None] // every * every // page, 0)  # [G, S]
    columns = np.arange(width)
    needed = (columns >= first[..., None]) & (columns < need[None, :, None])
    if (dropped := np.argwhere(np.any(needed & (tables == NULL_PAGE), axis=2))).size:
        g, s = dropped[0]
        raise ValueError(f"sequence {s}: layer group {g} has dropped a page that positions "
                         f"{cached[s]}..{ends[s] - 1} still need")


def contiguous_pages(group: int, seq: int, batch: int, width: int) -> range:
    """Pages of sequence ``seq`` of ``batch`` in layer group ``group`` when every sequence owns
    ``width`` contiguous pages (``generate()`` and ``Model.logits``); page 0 stays the null
    page. The cache holds ``contiguous_num_pages`` pages."""
    first = 1 + (group * batch + seq) * width
    return range(first, first + width)


def contiguous_num_pages(groups: int, batch: int, width: int) -> int:
    return groups * batch * width


def contiguous_block_tables(groups: int, batch: int, width: int) -> jax.Array:
    """``[G, B, W]`` tables of ``contiguous_pages``, in-jit."""
    g = jnp.arange(groups)[:, None, None]
    b = jnp.arange(batch)[None, :, None]
    return (1 + (g * batch + b) * width + jnp.arange(width)).astype(jnp.int32)


def prefill_layout(lengths: jax.Array, max_len: int, width: int, page_size: int,
                   groups: int = 1) -> tuple[jax.Array, AttentionMetadata]:
    """In-jit layout of prompts ``[B, max_len]`` of ``lengths`` packed back to back.

    Returns (flat row of each (b, i), ``B * max_len`` where i >= lengths[b]; metadata).
    Prompt token i of sequence b sits at position i in its contiguous block tables.
    """
    batch = lengths.shape[0]
    rows = batch * max_len
    starts = jnp.cumsum(lengths) - lengths
    i = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32)[None, :], (batch, max_len))
    valid = i < lengths[:, None]
    row = jnp.where(valid, starts[:, None] + i, rows)  # [B, max_len]
    tables = contiguous_block_tables(groups, batch, width)
    slot = slot_of(tables, jnp.minimum(i, width * page_size - 1)[None], page_size)  # [G, B, L]
    meta = AttentionMetadata(
        positions=jnp.zeros(rows, jnp.int32).at[row].set(i, mode="drop"),
        slot_mapping=jnp.full((groups, rows), -1, jnp.int32).at[:, row].set(slot, mode="drop"),
        block_tables=tables,
        seq_lens=lengths.astype(jnp.int32),
        query_start_loc=jnp.concatenate([jnp.zeros(1, jnp.int32),
                                         jnp.cumsum(lengths).astype(jnp.int32)]),
        num_seqs=jnp.int32(batch),
    )
    return row, meta


def decode_layout(positions: jax.Array, active: jax.Array, width: int, page_size: int,
                  groups: int = 1) -> AttentionMetadata:
    """In-jit layout of one row per sequence at ``positions [B]``; inactive rows write nothing.

    Positions are clipped into the block table so that no index ever leaves it, even for a
    finished sequence whose row is computed and discarded.
    """
    batch = positions.shape[0]
    pos = jnp.clip(positions, 0, width * page_size - 1).astype(jnp.int32)
    tables = contiguous_block_tables(groups, batch, width)
    slot = slot_of(tables, jnp.broadcast_to(pos[None, :, None], (groups, batch, 1)),
                   page_size)[..., 0]  # [G, B]
    return AttentionMetadata(
        positions=pos,
        slot_mapping=jnp.where(active[None], slot, -1).astype(jnp.int32),
        block_tables=tables,
        seq_lens=pos + 1,
        query_start_loc=jnp.arange(batch + 1, dtype=jnp.int32),
        num_seqs=jnp.int32(batch),
    )
