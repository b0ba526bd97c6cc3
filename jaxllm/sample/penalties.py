"""Repetition, frequency and presence penalties (vLLM's semantics) over persistent device state.

Penalties need each sequence's token history, which cannot travel with every step (a prompt
may be 1M tokens). So the engine keeps, next to the KV cache and donated through the step
like it, a penalty state of ``P`` slots (``max_num_seqs``: a running sequence's slot is its
batch row, ``jaxllm.engine.batch``) over the padded vocabulary:
``counts [P, V]`` (output tokens so far) and ``prompt_seen [P, V]``, both split over the
vocabulary axis exactly like the logits. Each step sends, per sequence, its slot (-1: no
penalty) and, per flat row, whether the row's token is a prompt or an output token.
Inside the step, before picking:

1. a sequence whose piece starts at position 0 (its first, or a recompute after a
   preemption) zeroes its slot;
2. every row's token is recorded: prompt rows in ``prompt_seen``, output rows in ``counts``
   (a decode step feeds the last picked token, so it counts before the next pick);
3. each sequence's slot is gathered and its logits penalised, in vLLM's order: repetition
   (a token seen in the prompt or the output: a positive logit is divided by r, another is
   multiplied by r), then frequency (``-= f * count``) and presence (``-= p * (count > 0)``).

A verifying step (``jaxllm.sample.verify_step``) scores positions past a sequence's first
too, one per draft: draft rows are never recorded before the pick (``penalize_drafts``
penalises position j + 1 as if drafts ``x_0..x_j`` had been generated), and once verification
has ruled, the accepted drafts are counted (``record_accepted``); the token emitted after them
is fed, and so recorded, by the next step like any picked token.

All of it runs under one ``lax.cond`` on "some sequence has a slot": batches without
penalties pay nothing. Prompt tokens served from the prefix cache never pass through a step,
so a request with penalties does not use the prefix cache.

Glossary: P state slots, V padded vocabulary, S sequence slots of a step, T flat rows.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxllm.sharding import LOGICAL_AXIS_RULES, axis_size, constrain, named_sharding

STATE_AXES = (None, "vocab")


class PenaltyState(NamedTuple):
    """Per penalty slot: how often each token was generated, and whether the prompt has it."""

    counts: jax.Array  # [P, V] int32
    prompt_seen: jax.Array  # [P, V] bool


class PenaltyRows(NamedTuple):
    """The host's per-step instructions; shapes fixed by the step's (rows, sequence slots)."""

    seq_slot: np.ndarray  # [S] int32: each sequence's penalty slot, -1 for none
    seq_reset: np.ndarray  # [S] int32: 1 zeroes the slot before this step's rows are recorded
    row_slot: np.ndarray  # [T] int32: the slot of each row's sequence, -1 for none / padding
    row_output: np.ndarray  # [T] int32: 1 an output token (counted), 0 a prompt token (seen)


def state_bytes_per_device(num_slots: int, padded_vocab: int, mesh: Mesh | None) -> int:
    """Device memory of the penalty state on each device (int32 counts + bool flags)."""
    shape = named_sharding(STATE_AXES, (num_slots, padded_vocab), mesh).shard_shape(
        (num_slots, padded_vocab))
    return math.prod(shape) * (4 + 1)


def init_state(num_slots: int, padded_vocab: int) -> PenaltyState:
    return PenaltyState(jnp.zeros((num_slots, padded_vocab), jnp.int32),
                        jnp.zeros((num_slots, padded_vocab), jnp.bool_))


def state_sharding(num_slots: int, padded_vocab: int, mesh: Mesh | None) -> PenaltyState:
    sharding = named_sharding(STATE_AXES, (num_slots, padded_vocab), mesh)
    return PenaltyState(sharding, sharding)


def no_rows(num_rows: int, num_seqs: int) -> PenaltyRows:
    """Instructions of a step in which no sequence uses a penalty."""
    return PenaltyRows(np.full(num_seqs, -1, np.int32), np.zeros(num_seqs, np.int32),
                       np.full(num_rows, -1, np.int32), np.zeros(num_rows, np.int32))


def penalize(logits: jax.Array, state: PenaltyState, rows: PenaltyRows, tokens: jax.Array,
             presence: jax.Array, frequency: jax.Array, repetition: jax.Array,
             mesh: Mesh | None = None) -> tuple[jax.Array, PenaltyState]:
    """Records this step's ``tokens [T]`` in ``state`` and penalises ``logits [S, V]``
    (see the module docstring); ``presence``, ``frequency``, ``repetition`` are ``[S]``.
    On a vocab-sharded mesh each device updates and reads only its slice of the state."""

    def local(index, logits, counts, seen, rows, tokens, presence, frequency, repetition):
        state = _record_rows(PenaltyState(counts, seen), rows, tokens - index * counts.shape[-1])
        count, seen = _gathered(state, rows.seq_slot)
        return _apply(logits, rows.seq_slot, count, seen, presence, frequency,
                      repetition), state

    def run(_):
        return _pinned(_on_slices(local, mesh, (logits, *state),
                                  (rows, tokens, presence, frequency, repetition),
                                  (_VOCAB_2D, PenaltyState(_VOCAB_2D, _VOCAB_2D))), mesh)

    return _pinned(jax.lax.cond(jnp.any(rows.seq_slot >= 0), run,
                                lambda _: _pinned((logits, state), mesh), None), mesh)


def penalize_drafts(logits: jax.Array, state: PenaltyState, seq_slot: jax.Array,
                    drafts: jax.Array, num_drafts: jax.Array, presence: jax.Array,
                    frequency: jax.Array, repetition: jax.Array,
                    mesh: Mesh | None = None) -> jax.Array:
    """Penalises the logits ``[S, k, V]`` of the positions after each sequence's first in a
    verifying step: row j as if the first ``j + 1`` of the sequence's ``drafts [S, k]`` (its
    ``num_drafts [S]`` real ones; the rest are -1) had been generated after the tokens
    ``state`` holds. Leaves ``state`` alone: drafts count once accepted
    (``record_accepted``)."""

    def local(index, logits, counts, seen, seq_slot, drafts, num_drafts, presence, frequency,
              repetition):
        k = drafts.shape[1]
        width = counts.shape[-1]
        local_ids = drafts - index * width
        real = ((jnp.arange(k)[None] < num_drafts[:, None]) & (local_ids >= 0)
                & (local_ids < width))
        drafted = jnp.zeros(logits.shape, jnp.int32).at[
            jnp.arange(len(drafts))[:, None], jnp.arange(k)[None],
            jnp.where(real, local_ids, width)].add(1, mode="drop")
        count, seen = _gathered(PenaltyState(counts, seen), seq_slot)
        count = count[:, None] + jnp.cumsum(drafted, axis=1)  # row j: drafts 0..j included
        return _apply(logits, seq_slot[:, None], count, seen[:, None], presence[:, None],
                      frequency[:, None], repetition[:, None])

    def run(_):
        return _pinned(_on_slices(local, mesh, (logits, *state),
                                  (seq_slot, drafts, num_drafts, presence, frequency,
                                   repetition), _VOCAB_3D), mesh)

    return _pinned(jax.lax.cond(jnp.any(seq_slot >= 0), run,
                                lambda _: _pinned(logits, mesh), None), mesh)


def record_accepted(state: PenaltyState, seq_slot: jax.Array, drafts: jax.Array,
                    num_accepted: jax.Array, mesh: Mesh | None = None) -> PenaltyState:
    """``state`` with each penalised sequence's first ``num_accepted [S]`` of its
    ``drafts [S, k]`` counted as generated."""

    def local(index, counts, seen, seq_slot, drafts, num_accepted):
        num_slots, width = counts.shape
        local_ids = drafts - index * width
        taken = ((jnp.arange(drafts.shape[1])[None] < num_accepted[:, None])
                 & (seq_slot[:, None] >= 0))
        slot = jnp.where(taken, seq_slot[:, None], num_slots)  # out of range: dropped
        token = jnp.where((local_ids >= 0) & (local_ids < width), local_ids, width)
        return PenaltyState(counts.at[slot, token].add(1, mode="drop"), seen)

    def run(_):
        return _pinned(_on_slices(local, mesh, tuple(state), (seq_slot, drafts, num_accepted),
                                  PenaltyState(_VOCAB_2D, _VOCAB_2D)), mesh)

    return _pinned(jax.lax.cond(jnp.any(seq_slot >= 0), run,
                                lambda _: _pinned(state, mesh), None), mesh)


_VOCAB_2D = PartitionSpec(None, LOGICAL_AXIS_RULES["vocab"])
_VOCAB_3D = PartitionSpec(None, None, LOGICAL_AXIS_RULES["vocab"])


def _on_slices(local, mesh: Mesh | None, split: tuple, whole: tuple, out_specs):
    """``local(slice index, *split, *whole)`` on each device's slice of the vocabulary:
    ``split`` are the logits (any rank, vocabulary last) and the state's arrays, ``whole``
    the replicated rest. Without a vocabulary split, once over everything (index 0)."""
    vocab_axis = LOGICAL_AXIS_RULES["vocab"]
    if axis_size(mesh, vocab_axis) == 1:
        return local(0, *split, *whole)
    specs = tuple(PartitionSpec(*([None] * (a.ndim - 1)), vocab_axis) for a in split)
    return jax.shard_map(
        lambda *a: local(jax.lax.axis_index(vocab_axis), *a), mesh=mesh,
        in_specs=(*specs, *(PartitionSpec(),) * len(whole)), out_specs=out_specs,
        check_vma=False)(*split, *whole)


def _pinned(tree, mesh: Mesh | None):
    """Every array of ``tree`` (logits of any rank, the state) split over the vocabulary, its
    last axis. The branches and the result are pinned: left unconstrained, the partitioner
    picked a replicated result for the step's output and all-gathered the whole state every
    step."""
    return jax.tree.map(lambda a: constrain(a, (None,) * (a.ndim - 1) + ("vocab",), mesh),
                        tree)


def _record_rows(state: PenaltyState, rows: PenaltyRows, local_tokens: jax.Array
                 ) -> PenaltyState:
    """Resets the slots of pieces from position 0, then records each row's token (ids
    relative to this slice; those outside it are dropped by the scatters)."""
    num_slots, width = state.counts.shape
    # Out-of-range indices (P for "no slot", width for "another slice's token") are dropped.
    reset = jnp.where((rows.seq_reset > 0) & (rows.seq_slot >= 0), rows.seq_slot, num_slots)
    counts = state.counts.at[reset].set(0, mode="drop")
    seen = state.prompt_seen.at[reset].set(False, mode="drop")
    token = jnp.where((local_tokens >= 0) & (local_tokens < width), local_tokens, width)
    slot = jnp.where(rows.row_slot >= 0, rows.row_slot, num_slots)
    output = rows.row_output > 0
    counts = counts.at[jnp.where(output, slot, num_slots), token].add(1, mode="drop")
    seen = seen.at[jnp.where(output, num_slots, slot), token].set(True, mode="drop")
    return PenaltyState(counts, seen)


def _gathered(state: PenaltyState, seq_slot: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each sequence's output counts and prompt flags ``[S, V]`` (slot 0's for none)."""
    gather = jnp.where(seq_slot >= 0, seq_slot, 0)
    return state.counts[gather], state.prompt_seen[gather]


def _apply(logits: jax.Array, seq_slot: jax.Array, count: jax.Array, prompt_seen: jax.Array,
           presence: jax.Array, frequency: jax.Array, repetition: jax.Array) -> jax.Array:
    """vLLM's penalties on ``logits`` given each row's output ``count`` and ``prompt_seen``
    (broadcast against them, as ``seq_slot`` and the penalties are); rows of sequences
    without a slot come back unchanged."""
    in_output = count > 0
    factor = jnp.where(prompt_seen | in_output, repetition[..., None], 1.0)
    penalised = jnp.where(logits > 0, logits / factor, logits * factor)
    penalised = penalised - frequency[..., None] * count.astype(logits.dtype)
    penalised = penalised - presence[..., None] * in_output.astype(logits.dtype)
    return jnp.where((seq_slot >= 0)[..., None], penalised, logits)
