"""Host-side construction of flat batches: token checks, positions and attention metadata.

Every index the device sees (positions, cache slots, page ids) is computed here, from one
place, with numpy on the host, and checked before it leaves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxllm.model import AttentionMetadata


def check_token_ids(token_ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    """Returns the ids as int32, or raises ValueError naming the first id outside the vocab."""
    ids = np.asarray(token_ids)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        first = ids[bad].flat[0]
        raise ValueError(f"Token id {int(first)} is out of vocabulary (vocab_size={vocab_size})")
    return ids.astype(np.int32)


def pages_needed(length: int, page_size: int) -> int:
    return -(-length // page_size)


def full_sequence_batch(
    lengths: Sequence[int], page_size: int, row_multiple: int = 1
) -> tuple[np.ndarray, AttentionMetadata, int]:
    """Metadata for fresh sequences of ``lengths`` packed back to back, no cached prefix.

    Sequence s gets its own contiguous pages. Rows are padded to a multiple of
    ``row_multiple`` (padding rows write nowhere and attend to nothing).
    Returns (positions [T], metadata, num_pages).
    """
    width = max(1, pages_needed(max(lengths), page_size))
    positions, slots, tables, starts = [], [], [], [0]
    for s, n in enumerate(lengths):
        pages = s * width + np.arange(width)
        pos = np.arange(n)
        positions.append(pos)
        slots.append(pages[pos // page_size] * page_size + pos % page_size)
        tables.append(pages)
        starts.append(starts[-1] + n)
    padding = -starts[-1] % row_multiple
    positions.append(np.zeros(padding, np.int64))
    slots.append(np.full(padding, -1, np.int64))
    meta = AttentionMetadata(
        slot_mapping=np.concatenate(slots).astype(np.int32),
        block_tables=np.stack(tables).astype(np.int32),
        seq_lens=np.asarray(lengths, np.int32),
        query_start_loc=np.asarray(starts, np.int32),
        num_seqs=np.int32(len(lengths)),
    )
    return np.concatenate(positions).astype(np.int32), meta, len(lengths) * width
