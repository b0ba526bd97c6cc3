"""Batched generation: a pure, jittable prefill + ``lax.while_loop`` decode, and ``generate()``.

The jittable core runs the same model forward as the serving engine: one flat prefill batch
of every prompt, then one row per sequence per decode step, over a paged KV cache where
sequence b owns pages ``b * W .. b * W + W - 1`` (W = pages per sequence).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.batch import check_token_ids
from jaxllm.model import AttentionMetadata, init_kv_cache
from jaxllm.sampling import GREEDY, SamplingArrays, SamplingParams, sample

if TYPE_CHECKING:
    from jaxllm.api import Model

MAX_STOP_IDS = 16  # stop ids per sequence, padded with -1 (a fixed shape: no recompiles)


def prefill_layout(lengths: jax.Array, max_len: int, pages_per_seq: int, page_size: int):
    """Packs prompts ``[B, max_len]`` of ``lengths`` back to back into flat rows.

    Returns (row index of each (b, i) or B * max_len when i >= lengths[b], metadata with
    positions). Prompt token i of sequence b sits at position i, in cache slot
    ``b * W * page_size + i`` (its pages are contiguous).
    """
    batch = lengths.shape[0]
    rows = batch * max_len
    starts = jnp.cumsum(lengths) - lengths
    i = jnp.arange(max_len)[None, :]
    valid = i < lengths[:, None]
    row = jnp.where(valid, starts[:, None] + i, rows)  # [B, max_len]
    positions = jnp.zeros(rows, jnp.int32).at[row].set(
        jnp.broadcast_to(i, row.shape), mode="drop")
    slot = jnp.arange(batch)[:, None] * pages_per_seq * page_size + i
    slot_mapping = jnp.full(rows, -1, jnp.int32).at[row].set(slot, mode="drop")
    meta = AttentionMetadata(
        slot_mapping=slot_mapping,
        block_tables=_block_tables(batch, pages_per_seq),
        seq_lens=lengths.astype(jnp.int32),
        query_start_loc=jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(lengths)]),
        num_seqs=jnp.int32(batch),
    )
    return row, positions, meta


def _block_tables(batch: int, pages_per_seq: int) -> jax.Array:
    return (jnp.arange(batch)[:, None] * pages_per_seq + jnp.arange(pages_per_seq)).astype(
        jnp.int32)


def decode_layout(positions: jax.Array, active: jax.Array, pages_per_seq: int, page_size: int):
    """One row per sequence at ``positions [B]``; inactive rows write nothing.

    Positions are clipped into the block table so that no index ever leaves it, even for a
    finished sequence whose row is computed and discarded.
    """
    batch = positions.shape[0]
    pos = jnp.clip(positions, 0, pages_per_seq * page_size - 1).astype(jnp.int32)
    slot = jnp.arange(batch) * pages_per_seq * page_size + pos
    return pos, AttentionMetadata(
        slot_mapping=jnp.where(active, slot, -1).astype(jnp.int32),
        block_tables=_block_tables(batch, pages_per_seq),
        seq_lens=pos + 1,
        query_start_loc=jnp.arange(batch + 1, dtype=jnp.int32),
        num_seqs=jnp.int32(batch),
    )


def generate_tokens(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    lengths: jax.Array,
    seeds: jax.Array,
    budgets: jax.Array,
    stop_ids: jax.Array,
    sampling: SamplingArrays,
    *,
    max_new_tokens: int,
    max_model_len: int,
    page_size: int,
    attention_impl: str,
) -> tuple[jax.Array, jax.Array]:
    """Generates up to ``max_new_tokens`` (static) tokens for each prompt; pure and jittable.

    tokens [B, L] int32 prompts padded on the right, lengths [B] (>= 1); seeds [B] uint32
    per-row PRNG seeds; budgets [B] per-row token limits (<= max_new_tokens); stop_ids
    [B, MAX_STOP_IDS] (-1 = unused). A row stops after a stop id (which it keeps), its budget,
    or when it reaches ``max_model_len`` tokens. Returns (out [B, max_new_tokens] padded with
    -1, number generated [B]).
    """
    model = nnx.merge(graphdef, params)
    batch, max_len = tokens.shape
    pages_per_seq = -(-max_model_len // page_size)
    cache = init_kv_cache(model.config, batch * pages_per_seq, page_size, model.embed.dtype,
                          model.mesh)
    base_keys = jax.vmap(jax.random.PRNGKey)(seeds)

    def pick(hidden, step):  # step [B]: the index of the token being chosen in each row
        keys = jax.vmap(jax.random.fold_in)(base_keys, step)
        return sample(model.logits(hidden), sampling, keys, model.mesh)

    def finished(token, count):
        is_stop = jnp.any(token[:, None] == stop_ids, axis=-1)
        return is_stop | (count >= budgets) | (lengths + count >= max_model_len)

    row, positions, meta = prefill_layout(lengths, max_len, pages_per_seq, page_size)
    flat = jnp.zeros(batch * max_len, jnp.int32).at[row].set(tokens, mode="drop")
    hidden, cache = model(flat, positions, cache, meta, attention_impl=attention_impl)
    first = pick(hidden[meta.query_start_loc[1:] - 1], jnp.zeros(batch, jnp.int32))
    out = jnp.full((batch, max_new_tokens), -1, jnp.int32).at[:, 0].set(first)
    count = jnp.ones(batch, jnp.int32)
    state = (out, count, first, finished(first, count), cache)

    def cond(state):
        _, count, _, done, _ = state
        return jnp.any(~done) & (jnp.max(count) < max_new_tokens)

    def body(state):
        out, count, last, done, cache = state
        # The last generated token sits at position lengths + count - 1.
        pos, meta = decode_layout(lengths + count - 1, ~done, pages_per_seq, page_size)
        hidden, cache = model(last, pos, cache, meta, attention_impl=attention_impl)
        token = pick(hidden, count)
        slot = jnp.where(done, max_new_tokens, count)
        out = out.at[jnp.arange(batch), slot].set(token, mode="drop")
        count = count + (~done)
        return out, count, jnp.where(done, last, token), done | finished(token, count), cache

    out, count, _, _, _ = jax.lax.while_loop(cond, body, state)
    return out, count


def generate(
    model: Model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    stop_token_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """Generated ids of each prompt (stop token included), greedy when ``sampling`` is None.

    Stops at EOS (``generation_config.json``), a stop id, ``max_new_tokens`` or
    ``max_model_len``. Prompts of any lengths run in bucketed batches of at most
    ``max_num_seqs``; a prompt + ``max_new_tokens`` over ``max_model_len`` is refused.
    """
    sampling = GREEDY if sampling is None else sampling
    policy = model.bucket_policy
    checked = []
    for prompt in prompts:
        ids = check_token_ids(list(prompt), model.config.vocab_size)
        if ids.ndim != 1:
            raise ValueError(f"each prompt must be a flat list of token ids, got shape "
                             f"{ids.shape}")
        policy.check_request(len(ids), max_new_tokens)
        checked.append(ids)
    stops = sorted(set(model.eos_token_ids) | set(stop_token_ids or ())
                   | set(sampling.stop_token_ids))
    if len(stops) > MAX_STOP_IDS:
        raise ValueError(f"{len(stops)} stop token ids given, at most {MAX_STOP_IDS}")
    check_token_ids(stops, model.config.vocab_size)
    seed = sampling.seed if sampling.seed is not None else secrets.randbits(32)

    results: list[list[int]] = []
    for start in range(0, len(checked), policy.max_num_seqs):
        group = checked[start : start + policy.max_num_seqs]
        out, count = model.run_generate(group, max_new_tokens, stops, sampling,
                                        seed + start)
        results += [out[b, : count[b]].tolist() for b in range(len(group))]
    return results


def pack_inputs(
    prompts: Sequence[np.ndarray], batch: int, length: int, max_new_tokens: int,
    stops: Sequence[int], sampling: SamplingParams, seed: int,
) -> tuple[np.ndarray, ...]:
    """Host arrays for ``generate_tokens``, padded to a (batch, length) bucket.

    Padding rows hold a one-token prompt with a budget of one token, and are discarded.
    """
    tokens = np.zeros((batch, length), np.int32)
    lengths = np.ones(batch, np.int32)
    for b, ids in enumerate(prompts):
        tokens[b, : len(ids)] = ids
        lengths[b] = len(ids)
    budgets = np.ones(batch, np.int32)
    budgets[: len(prompts)] = max_new_tokens
    stop_ids = np.full((batch, MAX_STOP_IDS), -1, np.int32)
    stop_ids[:, : len(stops)] = stops
    seeds = (np.uint64(seed) + np.arange(batch, dtype=np.uint64)).astype(np.uint32)
    arrays = SamplingArrays.from_params([sampling] * batch)
    return tokens, lengths, seeds, budgets, stop_ids, arrays
