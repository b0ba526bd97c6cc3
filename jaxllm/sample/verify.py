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
drafts and without filters picks what ``jaxllm.sample.sampling.sample`` would), and the acceptance
uniform uses ``fold_in(seed_key, t | 2**31)``, a key no token index reaches. A row's result never
depends on what else shares its batch.

Glossary: B rows (sequences), k drafts per row, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm.sample.sampling import SamplingArrays, filtered_logits, greedy
from jaxllm.sharding import constrain

_ACCEPT_TAG = 1 << 31  # token indices stay below it: the acceptance keys never collide


def filtered_distribution(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    """The target logits ``verify`` takes, from ``logits [N, V]`` (one row per scored position,
    logit_bias, min_tokens, penalties and the token mask already applied): ``logits / T``
    with every token top-k, top-p or min-p filters out at -inf, in vocabulary order, so their
    softmax is the distribution the ordinary sampler draws from. Greedy rows come back
    unscaled (verification only takes their argmax); only batches with a filtering row sort.

    The filters keep a prefix of the (stable) descending sort, so a token is kept iff it
    sorts no later than the prefix's last: ``(-logit, id)`` at most that token's. The test is
    elementwise in vocabulary order, so on a vocabulary-sharded mesh nothing but the sort
    itself (as the ordinary sampler's) crosses devices: no scatter back from sorted order."""
    samples = s.temperature > 0
    filters = samples & ((s.top_k > 0) | (s.top_p < 1) | (s.min_p > 0))
    scaled = logits / jnp.where(samples, s.temperature, 1.0)[:, None]

    def filtered(_):
        masked, order = filtered_logits(logits, s)
        last = jnp.maximum(jnp.sum(masked > -jnp.inf, axis=-1), 1) - 1  # kept prefix's end
        last_id = jnp.take_along_axis(order, last[:, None], axis=-1)
        cut = jnp.take_along_axis(logits, last_id, axis=-1)
        ids = jnp.arange(logits.shape[-1])[None, :]
        keep = (logits > cut) | ((logits == cut) & (ids <= last_id))
        return jnp.where(filters[:, None] & ~keep, -jnp.inf, scaled)

    return jax.lax.cond(jnp.any(filters), filtered, lambda _: scaled, None)


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
    keys (``jaxllm.sample.sampling.seed_keys``); ``first_index [B]`` int32 the token index (tokens
    generated so far) that position 0 chooses; ``draft_probs [B, k, V]`` the draft's ``q_j``
    over the target vocabulary, or None for point-mass drafts.

    Beyond its inputs, the sampled branch holds ``[B, V]`` arrays only: acceptance needs just
    ``p_j(x_j)`` per position, and only the first rejected (or the bonus) position is drawn.
    """
    rows, positions, vocab = target_logits.shape
    k = positions - 1
    if k < 1:
        raise ValueError(f"verify needs k >= 1 draft positions, got target logits for "
                         f"{positions} position(s)")
    j = jnp.arange(positions)
    is_draft = j[None, :k] < num_drafts[:, None]  # [B, k]
    drafts = jnp.where(is_draft, draft_tokens, -1)

    best = greedy(target_logits.reshape(rows * positions, vocab), mesh).reshape(rows, positions)
    greedy_run = _run_length(is_draft & (drafts == best[:, :k]))

    def sampled(_):
        accept = _accept(target_logits, drafts, is_draft, seed_keys, first_index, draft_probs)
        run = jnp.where(is_greedy, greedy_run, _run_length(accept))
        pick = _recover(target_logits, drafts, run, run < num_drafts, seed_keys, first_index,
                        draft_probs, mesh)
        return run, jnp.where(is_greedy, _at(best, run), pick)

    num_accepted, pick = jax.lax.cond(jnp.any(~is_greedy), sampled,
                                      lambda _: (greedy_run, _at(best, greedy_run)), None)
    padded = jnp.concatenate([drafts, jnp.full((rows, 1), -1, drafts.dtype)], axis=-1)
    tokens = jnp.where(j[None] < num_accepted[:, None], padded,
                       jnp.where(j[None] == num_accepted[:, None], pick[:, None], -1))
    return Verified(tokens.astype(jnp.int32), num_accepted.astype(jnp.int32))


def _run_length(accepted: jax.Array) -> jax.Array:
    """Leading True entries of each row of ``accepted [B, k]``."""
    return jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=-1), axis=-1)


def _at(x: jax.Array, position: jax.Array) -> jax.Array:
    """``x[b, position[b]]`` for ``x [B, P, ...]``: one position per row."""
    index = position.reshape(-1, *([1] * (x.ndim - 1)))
    return jnp.take_along_axis(x, index, axis=1)[:, 0]


def _token_keys(seed_keys: jax.Array, index: jax.Array) -> jax.Array:
    return jax.vmap(lambda key, t: jax.vmap(lambda i: jax.random.fold_in(key, i))(t))(
        seed_keys, index.astype(jnp.uint32))


def _accept(logits, drafts, is_draft, seed_keys, first_index, draft_probs) -> jax.Array:
    """Each draft's acceptance ``[B, k]``: ``u < p_j(x_j) / q_j(x_j)``."""
    k, vocab = drafts.shape[1], logits.shape[-1]
    is_x = jnp.arange(vocab)[None, None] == drafts[..., None]  # [B, k, V]; none for -1
    # Masked sums rather than gathers: each vocabulary shard reduces its own slice.
    logit_x = jnp.sum(jnp.where(is_x, logits[:, :k], 0.0), axis=-1)
    p_x = jnp.exp(logit_x - jax.nn.logsumexp(logits[:, :k], axis=-1))
    if draft_probs is None:
        q_x = jnp.ones_like(p_x)
    else:
        q_x = jnp.sum(jnp.where(is_x, draft_probs.astype(jnp.float32), 0.0), axis=-1)
    index = first_index[:, None] + jnp.arange(k)[None]
    keys = _token_keys(seed_keys, index.astype(jnp.uint32) | jnp.uint32(_ACCEPT_TAG))
    u = jax.vmap(jax.vmap(lambda key: jax.random.uniform(key, ())))(keys)
    return is_draft & (u * q_x < p_x)  # u < p/q without dividing by a zero q


def _recover(logits, drafts, position, rejected, seed_keys, first_index, draft_probs, mesh
             ) -> jax.Array:
    """Each row's draw at ``position [B]``: from ``norm(max(0, p - q))`` where the draft there
    was ``rejected``, else (every draft accepted) from ``p``; ``[B]`` token ids."""
    k, vocab = drafts.shape[1], logits.shape[-1]
    logp = jax.nn.log_softmax(_at(logits, position), axis=-1)  # [B, V]
    draft_at = _at(drafts, jnp.minimum(position, k - 1))
    if draft_probs is None:
        residual = jnp.where(jnp.arange(vocab)[None] == draft_at[:, None], 0.0, jnp.exp(logp))
    else:
        q = _at(draft_probs, jnp.minimum(position, k - 1)).astype(jnp.float32)
        residual = jnp.maximum(jnp.exp(logp) - q, 0.0)
    # A rejection is impossible where p <= q everywhere (then p == q); keep p there so a
    # rounding-level rejection still draws from a distribution.
    usable = rejected[:, None] & jnp.any(residual > 0, axis=-1, keepdims=True)
    dist = jnp.where(usable, jnp.log(residual), logp)
    keys = _token_keys(seed_keys, (first_index + position)[:, None])[:, 0]
    noise = jax.vmap(lambda key: jax.random.gumbel(key, (vocab,)))(keys)
    return greedy(dist + constrain(noise, (None, "vocab"), mesh), mesh)
