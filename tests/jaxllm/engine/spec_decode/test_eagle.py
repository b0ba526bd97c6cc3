"""EAGLE-3 drafting in the step: the paged first pass plus k - 1 decode rows against the head's
definition run autoregressively in torch over each whole sequence (no cache)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jaxllm.engine.spec_decode.eagle import draft
from jaxllm.layout import contiguous_num_pages, prefill_layout
from jaxllm.weights.eagle3 import load_eagle3
from tests.jaxllm.model.test_eagle3 import HD, TARGET_D, VOCAB, D, K, _reference, _weights, _write

DRAFTS = 4


def test_drafts_match_the_head_run_autoregressively(tmp_path):
    w = _weights(7, embedding=False)
    head = load_eagle3(_write(tmp_path / "head", w, "eagle"), dtype=jnp.float32)
    g = torch.Generator().manual_seed(8)
    table = torch.randn(VOCAB, D, generator=g)  # the target's embedding, shared
    # Sequence 0 runs 6 rows of which verification kept 4; sequence 1 keeps all of its 5.
    lengths, kept = [6, 5], [4, 5]
    page_size, width = 4, 4
    row, meta = prefill_layout(jnp.asarray(lengths), max(lengths), width, page_size)
    meta = meta.for_group(0)
    rows = 2 * max(lengths)
    tokens = np.zeros(rows, np.int64)
    features = np.zeros((rows, 3 * TARGET_D), np.float32)
    valid = np.zeros(rows, bool)
    seqs, feats = [], []
    for b, (n, keep) in enumerate(zip(lengths, kept, strict=True)):
        at = np.asarray(row[b, :n])
        seqs.append(torch.randint(0, VOCAB, (n,), generator=g))
        feats.append(torch.randn(n, 3 * TARGET_D, generator=g))
        tokens[at], features[at], valid[at[:keep]] = seqs[b].numpy(), feats[b].numpy(), True
    last = jnp.asarray([int(row[b, keep - 1]) for b, keep in enumerate(kept)])
    cache = (jnp.zeros((contiguous_num_pages(1, 2, width), page_size, K, HD), jnp.float32),) * 2

    def embed(ids):
        return jnp.asarray(table.numpy())[ids]

    run = jax.jit(lambda c, *a: draft(head, embed, c, *a, k=DRAFTS, page_size=page_size))
    drafts, _ = run(cache, meta, jnp.asarray(tokens), jnp.asarray(features), jnp.asarray(valid),
                    last)

    d2t = w["d2t"]
    with torch.no_grad():
        for b, keep in enumerate(kept):
            ids = list(seqs[b][:keep])
            hidden = feats[b][:keep] @ w["fc.weight"].T
            want = []
            for _ in range(DRAFTS):
                _, pre, logits = _reference(w, table[torch.tensor(ids)], hidden, False)
                best = int(logits[-1].argmax())
                want.append(best + int(d2t[best]))
                ids.append(want[-1])
                hidden = torch.cat([hidden, pre[-1:]])
            assert np.asarray(drafts[b]).tolist() == want, b
