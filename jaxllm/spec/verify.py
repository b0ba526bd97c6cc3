"""Verification of drafted tokens against the target's distributions, inside the compiled step.

Each speculating sequence brings ``k`` drafts ``x_0..x_{k-1}`` (``num_drafts`` of them real) and
the target scores ``k + 1`` positions: position j's distribution ``p_j`` is the target's next
token distribution after the sequence plus ``x_0..x_{j-1}``, already adjusted by the sampler
(logit_bias, min_tokens, penalties, the structured-output mask, temperature, top-k/top-p/min-p).

- Greedy rows accept the longest prefix of drafts equal to each position's argmax, then emit
  the argmax at the first mismatch (or after the last draft): exactly the tokens greedy
  decoding without drafts would emit.
- Sampled rows use the standard rule (Leviathan et al. 2023; Chen et al. 2023): accept ``x_j``
  with probability ``min(1, p_j(x_j) / q_j(x_j))``; at the first rejection emit a draw from
  ``norm(max(0, p_j - q_j))``; when every draft is accepted emit a draw from ``p_{num_drafts}``.
  Each emitted token is then distributed exactly as ``p_j``. ``q`` is the draft's distribution;
  a draft that is a deterministic function of the context (n-gram, an argmax-drafting head) is
  a point mass, ``draft_probs=None``: accept with probability ``p_j(x_j)``, recover from
  ``p_j`` with ``x_j`` removed.

Randomness is keyed per (request seed, token index) as in the ordinary sampler: the recovery or
bonus draw at token index t uses the Gumbel noise of ``fold_in(seed_key, t)`` (so a row without
drafts and without filters picks what ``jaxllm.sampling.sample`` would), and the acceptance
uniform uses ``fold_in(seed_key, t | 2**31)``, a key no token index reaches. A row's result never
depends on what else shares its batch.

Glossary: B rows (sequences), k drafts per row, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm.sampling import greedy
from jaxllm.sharding import constrain

_ACCEPT_TAG = 1 << 31  # token indices stay below it: the acceptance keys never collide


class Verified(NamedTuple):
    """Per row: the emitted tokens and how many drafts were accepted."""

    tokens: jax.Array  # [B, k + 1] int32: accepted drafts, then the recovered/bonus token; -1 after
    num_accepted: jax.Array  # [B] int32 in [0, num_drafts]; the row emits num_accepted + 1


def verify(
    target_logits: jax.Array,
    draft_tokens: jax.Array,
    num_drafts: jax.Array,
    is_greedy: jax.Array,
    seed_keys: jax.Array,
    first_index: jax.Array,
    draft_probs: jax.Array | None = None,
    mesh: Mesh | None = None,
) -> Verified:
    """Accepts or rejects each row's drafts and picks the token after the accepted run.

    ``target_logits [B, k + 1, V]``: adjusted logits whose softmax is ``p_j`` (filtered tokens at
    -inf; a greedy row's are only argmaxed). ``draft_tokens [B, k]`` int32 (entries at or past
    ``num_drafts [B]`` are ignored); ``is_greedy [B]`` bool; ``seed_keys [B]`` the rows' PRNG
    keys (``jaxllm.sampling.seed_keys``); ``first_index [B]`` int32 the token index (tokens
    generated so far) that position 0 chooses; ``draft_probs [B, k, V]`` the draft's ``q_j``
    over the target vocabulary, or None for point-mass drafts.
    """
    rows, positions, vocab = target_logits.shape
    k = positions - 1
    j = jnp.arange(positions)
    is_draft = j[None, :k] < num_drafts[:, None]  # [B, k]
    drafts = jnp.where(is_draft, draft_tokens, -1)

    best = greedy(target_logits.reshape(rows * positions, vocab), mesh).reshape(rows, positions)
    matches = is_draft & (drafts == best[:, :k])

    def sampled(_):
        accept, pick = _rejection_sample(target_logits, drafts, is_draft, seed_keys,
                                         first_index, draft_probs, mesh)
        return (jnp.where(is_greedy[:, None], matches, accept),
                jnp.where(is_greedy[:, None], best, pick))

    accepted, pick = jax.lax.cond(jnp.any(~is_greedy), sampled, lambda _: (matches, best), None)
    num_accepted = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=-1), axis=-1)
    padded = jnp.concatenate([drafts, jnp.full((rows, 1), -1, drafts.dtype)], axis=-1)
    tokens = jnp.where(j[None] < num_accepted[:, None], padded,
                       jnp.where(j[None] == num_accepted[:, None], pick, -1))
    return Verified(tokens.astype(jnp.int32), num_accepted.astype(jnp.int32))


def _rejection_sample(logits, drafts, is_draft, seed_keys, first_index, draft_probs, mesh):
    """(accept [B, k], pick [B, k + 1]): each draft's acceptance, and at every position the
    draw a rejection there (or the bonus after the last draft) would emit."""
    rows, positions, vocab = logits.shape
    k = positions - 1
    index = (first_index[:, None] + jnp.arange(positions)[None]).astype(jnp.uint32)
    keys = jax.vmap(lambda key, t: jax.vmap(lambda i: jax.random.fold_in(key, i))(t))(
        seed_keys, index)
    accept_keys = jax.vmap(lambda key, t: jax.vmap(lambda i: jax.random.fold_in(key, i))(t))(
        seed_keys, index | jnp.uint32(_ACCEPT_TAG))

    logp = jax.nn.log_softmax(logits, axis=-1)  # [B, k + 1, V]
    p = jnp.exp(logp[:, :k])
    is_x = jnp.arange(vocab)[None, None] == drafts[..., None]  # [B, k, V]; no row for -1
    # Masked sums rather than gathers: each vocabulary shard reduces its own slice.
    p_x = jnp.sum(jnp.where(is_x, p, 0.0), axis=-1)
    if draft_probs is None:
        q_x = jnp.ones_like(p_x)
        residual = jnp.where(is_x, 0.0, p)
    else:
        q = draft_probs.astype(jnp.float32)
        q_x = jnp.sum(jnp.where(is_x, q, 0.0), axis=-1)
        residual = jnp.maximum(p - q, 0.0)
    u = jax.vmap(jax.vmap(lambda key: jax.random.uniform(key, ())))(accept_keys[:, :k])
    accept = is_draft & (u * q_x < p_x)  # u < p/q without dividing by a zero q

    # A rejection is impossible where p <= q everywhere (then p == q); keep p there so a
    # rounding-level rejection still draws from a distribution.
    usable = is_draft[..., None] & jnp.any(residual > 0, axis=-1, keepdims=True)
    log_residual = jnp.where(usable, jnp.log(residual), logp[:, :k])
    dist = jnp.concatenate([log_residual, logp[:, k:]], axis=1)  # [B, k + 1, V]
    noise = jax.vmap(jax.vmap(lambda key: jax.random.gumbel(key, (vocab,))))(keys)
    noise = constrain(noise, (None, None, "vocab"), mesh)
    pick = greedy((dist + noise).reshape(rows * positions, vocab), mesh)
    return accept, pick.reshape(rows, positions)
