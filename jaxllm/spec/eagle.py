"""Drafting k tokens with an EAGLE-3 head inside the compiled step (top-1 drafts).

After the target has run a step's rows (and verification has decided what each sequence
keeps), the head runs once over the same rows, each row pairing the target's features at its
position with the token emitted after it (vLLM's shift by one): the head's row at position p
predicts the token at p + 2. The last valid row of each sequence gives the first draft; each
of the other k - 1 drafts is one decode row per sequence, fed the previous draft and the
head's own hidden state ``pre``. Drafts are argmaxes, so the proposal is a point mass and
verification takes ``draft_probs=None`` (``jaxllm.spec.verify``).

The head's KV cache is its own slab, addressed by its own block tables with the target's slot
rule (``jaxllm.layout.slot_of``); rows that verification rejected write nothing.

Glossary: T flat rows, S sequence slots, k drafts, W block-table width.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxllm.layout import AttentionMetadata, slot_of
from jaxllm.models.eagle3 import Eagle3Head
from jaxllm.sampling import greedy


def draft(
    head: Eagle3Head,
    embed: Callable[[jax.Array], jax.Array],
    cache: tuple[jax.Array, jax.Array],
    meta: AttentionMetadata,
    tokens: jax.Array,
    features: jax.Array,
    row_valid: jax.Array,
    last_row: jax.Array,
    *,
    k: int,
    page_size: int,
    attention_impl: str = "xla",
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Drafts ``[S, k]`` (target vocabulary ids) and the head's updated cache.

    ``meta``: the rows' metadata in the head's own group (one group: ``slot_mapping [T]``,
    ``block_tables [S, W]``). ``tokens [T]``: for each row, the token at its position + 1
    (the accepted draft or the verified token); ``features [T, 3 D_t]``: the target's
    auxiliary hidden states at each row (``Llama4.forward(aux_layers=...)``);
    ``row_valid [T]``: rows whose token was kept (others write no KV); ``last_row [S]``: each
    sequence's last valid row. ``embed`` maps token ids to the head's input embeddings (the
    target's, unless the head has its own). Sequence slots past ``meta.num_seqs`` draft
    garbage and write nothing.
    """
    meta = meta._replace(slot_mapping=jnp.where(row_valid, meta.slot_mapping, -1))
    normed, pre, cache = head(embed(tokens), head.combine(features), cache, meta,
                              attention_impl=attention_impl)
    first = _pick(head, normed[last_row])
    width = meta.block_tables.shape[-1]
    active = jnp.arange(last_row.shape[0]) < meta.num_seqs

    def step(carry, i):
        token, hidden, cache = carry
        # Clipped into the block table: a sequence at its limit drafts garbage the host drops.
        pos = jnp.clip(meta.positions[last_row] + i, 0, width * page_size - 1)
        slots = slot_of(meta.block_tables, pos[:, None], page_size)[:, 0]
        row_meta = AttentionMetadata(
            positions=pos.astype(jnp.int32),
            slot_mapping=jnp.where(active, slots, -1).astype(jnp.int32),
            block_tables=meta.block_tables,
            seq_lens=(pos + 1).astype(jnp.int32),
            query_start_loc=jnp.arange(last_row.shape[0] + 1, dtype=jnp.int32),
            num_seqs=meta.num_seqs,
        )
        normed, pre, cache = head(embed(token), hidden, cache, row_meta,
                                  attention_impl=attention_impl)
        nxt = _pick(head, normed)
        return (nxt, pre, cache), nxt

    (_, _, cache), rest = jax.lax.scan(step, (first, pre[last_row], cache),
                                       jnp.arange(1, k))
    return jnp.concatenate([first[:, None], rest.T], axis=1).astype(jnp.int32), cache


def _pick(head: Eagle3Head, normed: jax.Array) -> jax.Array:
    """The head's most likely next token, in target vocabulary ids (argmax per vocabulary
    shard on a mesh, as the sampler's greedy pick)."""
    return head.to_target(greedy(head.logits(normed), head.mesh))
