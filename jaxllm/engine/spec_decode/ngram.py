"""N-gram (prompt lookup) drafts, proposed on the host from a sequence's own tokens.

vLLM's ``NgramProposer`` semantics: among suffixes of the sequence of ``min_n``..``max_n``
tokens, take the longest one that also occurs earlier with at least one token after it (the
occurrence may overlap the suffix); of its occurrences take the earliest, and propose the up
to ``k`` tokens that follow it, never past the end of the sequence nor past ``max_model_len``.

The search is vectorised: one comparison of the whole sequence against its last token finds
the candidate occurrences, and each further suffix length filters the survivors (a loop over
``max_n``, not over tokens).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def propose(tokens: np.ndarray, *, min_n: int, max_n: int, k: int,
            max_model_len: int) -> np.ndarray:
    """The draft for one sequence ``tokens [T]``: up to ``k`` token ids (possibly none)."""
    tokens = np.asarray(tokens)
    total = tokens.shape[0]
    k = min(k, max_model_len - total)
    if total < min_n or k <= 0 or total < 2:
        return tokens[:0]
    # ends[i]: the last index of a candidate occurrence; it must leave one token after it.
    ends = np.flatnonzero(tokens[: total - 1] == tokens[total - 1])
    if ends.size == 0:
        return tokens[:0]
    matched = np.ones(ends.shape, np.int32)  # suffix tokens matched backwards from each end
    alive = np.ones(ends.shape, bool)
    for j in range(1, min(max_n, total - 1)):
        idx = ends - j
        alive &= idx >= 0
        alive[alive] = tokens[idx[alive]] == tokens[total - 1 - j]
        if not alive.any():
            break
        matched += alive
    longest = int(matched.max())
    if longest < min_n:
        return tokens[:0]
    start = int(ends[np.argmax(matched == longest)]) + 1  # argmax: the earliest occurrence
    return tokens[start: start + k]


def propose_batch(sequences: Sequence[np.ndarray], *, min_n: int, max_n: int, k: int,
                  max_model_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Drafts for several sequences as the step carries them: ``(drafts [B, k] int32, -1
    padded, num_drafts [B] int32)``."""
    drafts = np.full((len(sequences), k), -1, np.int32)
    counts = np.zeros(len(sequences), np.int32)
    for b, seq in enumerate(sequences):
        d = propose(seq, min_n=min_n, max_n=max_n, k=k, max_model_len=max_model_len)
        drafts[b, : d.shape[0]] = d
        counts[b] = d.shape[0]
    return drafts, counts
