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
    vocab_axis = LOGICAL_AXIS_RULES["vocab"]
    n = axis_size(mesh, vocab_axis)

    def local(logits, counts, seen, rows, tokens, presence, frequency, repetition):
        first = jax.lax.axis_index(vocab_axis) * logits.shape[-1] if n > 1 else 0
        return _penalize_slice(logits, PenaltyState(counts, seen), rows, tokens - first,
                               presence, frequency, repetition)

    def pinned(logits, state):
        # The branches and the result keep the state split over the vocabulary: left
        # unconstrained, the partitioner picked a replicated result for the step's output
        # and all-gathered the whole state every step.
        return (constrain(logits, STATE_AXES, mesh),
                PenaltyState(*(constrain(a, STATE_AXES, mesh) for a in state)))

    def run(_):
        args = (logits, *state, rows, tokens, presence, frequency, repetition)
        if n == 1:
            return pinned(*local(*args))
        vocab = PartitionSpec(None, vocab_axis)
        rep = PartitionSpec()
        return pinned(*jax.shard_map(
            local, mesh=mesh, in_specs=(vocab, vocab, vocab, rep, rep, rep, rep, rep),
            out_specs=(vocab, PenaltyState(vocab, vocab)), check_vma=False)(*args))

    return pinned(*jax.lax.cond(jnp.any(rows.seq_slot >= 0), run,
                                lambda _: pinned(logits, state), None))


def _penalize_slice(logits: jax.Array, state: PenaltyState, rows: PenaltyRows,
                    local_tokens: jax.Array, presence: jax.Array, frequency: jax.Array,
                    repetition: jax.Array) -> tuple[jax.Array, PenaltyState]:
    """``penalize`` on one slice of the vocabulary; ``local_tokens`` are ids relative to the
    slice (those outside it are dropped by the scatters)."""
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

    has = rows.seq_slot >= 0
    gather = jnp.where(has, rows.seq_slot, 0)
    count = counts[gather]  # [S, V]
    in_output = count > 0
    factor = jnp.where(seen[gather] | in_output, repetition[:, None], 1.0)
    penalised = jnp.where(logits > 0, logits / factor, logits * factor)
    penalised = penalised - frequency[:, None] * count.astype(logits.dtype)
    penalised = penalised - presence[:, None] * in_output.astype(logits.dtype)
    return jnp.where(has[:, None], penalised, logits), PenaltyState(counts, seen)
