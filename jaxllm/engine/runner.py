"""The runner: executes one engine step over a persistent paged cache. Nothing else.

The scheduler decides which tokens of which sequences run; ``jaxllm.layout.build_step`` turns
them into bucketed, range-checked arrays; ``ModelRunner`` runs the one model forward with the
KV cache donated, so the pages are updated in place from step to step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm.api import Model
from jaxllm.buckets import BucketPolicy
from jaxllm.kv_cache import LayerGroups, init_kv_cache, kv_cache_sharding
from jaxllm.layout import AttentionMetadata, SeqChunk, StepBatch, build_step
from jaxllm.penalties import (
    PenaltyRows,
    PenaltyState,
    SeqPenalty,
    build_rows,
    init_state,
    no_rows,
    penalize,
    state_sharding,
)
from jaxllm.sampling import (
    GREEDY,
    SamplingArrays,
    SamplingParams,
    adjust_logits,
    apply_token_mask,
    mask_words,
    sample,
    seed_keys,
    seed_words,
)
from jaxllm.sharding import to_host

TOP_LOGPROBS = 20  # the most the OpenAI API asks for


class StepInputs(NamedTuple):
    """The host arrays of one sampled step; their shapes depend only on the step's (token
    bucket, batch bucket), so followers of a multi-process engine can receive them."""

    tokens: np.ndarray  # [T] int32
    meta: AttentionMetadata
    logits_rows: np.ndarray  # [S] int32
    sampling: SamplingArrays
    seeds: np.ndarray  # [S, 2] uint32: each 64-bit seed's words (``seed_words``)
    steps: np.ndarray  # [S] int32
    penalty_rows: PenaltyRows  # which penalty slots this step records into and reads
    # [S, ceil(V / 32)] int32: each row's allowed tokens as bits (structured outputs; all
    # ones: unconstrained), ``jaxllm.sampling.apply_token_mask``.
    token_mask: np.ndarray


class Sampled(NamedTuple):
    """One step's picks, per sequence: token, its log-probability, and the top alternatives."""

    tokens: np.ndarray  # [S] int32
    logprobs: np.ndarray  # [S] float32
    top_ids: np.ndarray  # [S, TOP_LOGPROBS] int32
    top_logprobs: np.ndarray  # [S, TOP_LOGPROBS] float32


def pick(logits: jax.Array, sampling: SamplingArrays, seeds: jax.Array, steps: jax.Array,
         mesh: Mesh | None, penalties: PenaltyState, rows: PenaltyRows, fed: jax.Array,
         token_mask: jax.Array) -> tuple[tuple[jax.Array, ...], PenaltyState]:
    """Each row's next token, its log-probability and the top alternatives; and the penalty
    state with the step's ``fed`` tokens recorded. Order (vLLM's): logit_bias and min_tokens,
    then the penalties, then temperature and the filters."""
    # A row's key depends only on its request's seed and token index, so a seeded
    # request samples the same tokens whatever else shares its batch.
    keys = jax.vmap(jax.random.fold_in)(seed_keys(seeds), steps)
    adjusted, penalties = penalize(
        adjust_logits(logits, sampling, steps), penalties, rows, fed, sampling.presence_penalty,
        sampling.frequency_penalty, sampling.repetition_penalty, mesh)
    # Structured outputs: tokens outside a constrained row's grammar can never be picked.
    adjusted = apply_token_mask(adjusted, token_mask, mesh)
    tokens = sample(adjusted, sampling, keys, mesh)
    # Log-probabilities under the model's own distribution (before temperature and
    # filters), for the chosen token and the TOP_LOGPROBS most likely ones.
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_values, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
    return (tokens, chosen, top_ids, top_values), penalties


def step_functions(graphdef: nnx.GraphDef, attention_impl: str, mesh: Mesh | None,
                   groups: LayerGroups) -> tuple[Callable, Callable]:
    """The step's pure functions, (forward, forward_and_sample), for the runner's jit and for
    compiling the same step ahead of time (``jaxllm.aot``).

    forward(params, cache, tokens, meta, logits_rows) -> (logits, cache);
    forward_and_sample(params, cache, penalties, tokens, meta, logits_rows, sampling, seeds,
    steps, penalty_rows, token_mask) -> ((tokens, logprobs, top ids, top logprobs), cache,
    penalties).
    """

    def forward(params, cache, tokens, meta, logits_rows):
        module = nnx.merge(graphdef, params)
        hidden, cache = module(tokens, cache, meta, attention_impl=attention_impl,
                               groups=groups)
        return module.logits(hidden[logits_rows]), cache

    def forward_and_sample(params, cache, penalties, tokens, meta, logits_rows, sampling,
                           seeds, steps, penalty_rows, token_mask):
        logits, cache = forward(params, cache, tokens, meta, logits_rows)
        picked, penalties = pick(logits, sampling, seeds, steps, mesh, penalties,
                                 penalty_rows, tokens, token_mask)
        return picked, cache, penalties

    return forward, forward_and_sample


SCORE_BLOCK = 256  # rows whose full-vocabulary log-probabilities exist at once


def scoring_step_function(graphdef: nnx.GraphDef, attention_impl: str, mesh: Mesh | None,
                          groups: LayerGroups) -> Callable:
    """The step that also scores every row (prompt log-probabilities, for ``echo`` and
    ``prompt_logprobs``): ``(..., penalty_rows, token_mask, targets [T]) -> ((picked...), (target
    logprob [T], top ids [T, K], top logprobs [T, K])), cache, penalties``. Row t's target
    is the token that follows it (-1: none). The vocabulary-wide log-softmax runs
    ``SCORE_BLOCK`` rows at a time, so its memory does not grow with the step's width."""
    def forward_sample_and_score(params, cache, penalties, tokens, meta, logits_rows, sampling,
                                 seeds, steps, penalty_rows, token_mask, targets):
        module = nnx.merge(graphdef, params)
        hidden, cache = module(tokens, cache, meta, attention_impl=attention_impl,
                               groups=groups)
        picked, penalties = pick(module.logits(hidden[logits_rows]), sampling, seeds, steps,
                                 mesh, penalties, penalty_rows, tokens, token_mask)
        rows = hidden.shape[0]
        block = math.gcd(rows, SCORE_BLOCK)

        def score(args):
            h, t = args
            logprobs = jax.nn.log_softmax(module.logits(h), axis=-1)
            chosen = jnp.take_along_axis(logprobs, jnp.maximum(t, 0)[:, None], axis=-1)[:, 0]
            top_values, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
            return jnp.where(t >= 0, chosen, 0.0), top_ids, top_values

        scored = jax.lax.map(score, (hidden.reshape(rows // block, block, -1),
                                     targets.reshape(rows // block, block)))
        scored = jax.tree.map(lambda a: a.reshape(rows, *a.shape[2:]), scored)
        return (picked, scored), cache, penalties

    return forward_sample_and_score


def _step_programs(model: Model, groups: LayerGroups):
    """The two jitted step programs (cache, and the sampler's penalty state, donated): logits
    of each sequence's last row, and logits + on-device sampling + log-probabilities."""
    forward, forward_and_sample = step_functions(model.graphdef, model.attention_impl,
                                                 model.mesh, groups)
    rep = model.replicated()
    logits_fn = jax.jit(forward, donate_argnums=(1,),
                        in_shardings=(model.param_shardings, None) + (rep,) * 3)
    sample_fn = jax.jit(forward_and_sample, donate_argnums=(1, 2),
                        in_shardings=(model.param_shardings, None, None) + (rep,) * 8,
                        out_shardings=((rep,) * 4, None, None))
    return logits_fn, sample_fn


def step_temp_bytes(model: Model, policy: BucketPolicy) -> int:
    """Temporary device memory of the widest step (largest token and batch bucket), read from
    the compiled program (``memory_analysis``); compiled with abstract inputs, so nothing is
    allocated. Cached on the model per configuration."""

    def measure() -> int:
        config, cache = model.config, policy.cache
        groups = cache.groups(config)
        rows, slots = policy.token_buckets[-1], policy.batch_buckets[-1]
        width, num_groups = policy.pages_per_seq, groups.num_groups
        pages = jax.ShapeDtypeStruct(cache.page_shape(config), cache.dtype,
                                     sharding=kv_cache_sharding(config, cache, model.mesh))
        i32 = functools.partial(jax.ShapeDtypeStruct, dtype=np.int32)
        meta = AttentionMetadata(i32((rows,)), i32((num_groups, rows)),
                                 i32((num_groups, slots, width)), i32((slots,)),
                                 i32((slots + 1,)), i32(()))
        shape = (policy.max_num_seqs, padded_vocab(model))
        state = PenaltyState(*(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
                               for dtype, sharding in zip(
                                   (np.int32, np.bool_),
                                   state_sharding(*shape, model.mesh), strict=True)))
        _, sample_fn = _step_programs(model, groups)
        compiled = sample_fn.lower(
            model.params, [(pages, pages)] * groups.num_slabs, state, i32((rows,)), meta,
            i32((slots,)), SamplingArrays.from_params([GREEDY] * slots),
            jax.ShapeDtypeStruct((slots, 2), np.uint32), i32((slots,)),
            no_rows(rows, slots), i32((slots, mask_words(padded_vocab(model))))).compile()
        return int(compiled.memory_analysis().temp_size_in_bytes)

    return model.compiled(("step_temp_bytes", policy), measure)


class Scored(NamedTuple):
    """Per flat row: the log-probability of the token that follows it, and the top ones."""

    logprobs: np.ndarray  # [rows] float32 (0 where there is no following token)
    top_ids: np.ndarray  # [rows, TOP_LOGPROBS] int32
    top_logprobs: np.ndarray  # [rows, TOP_LOGPROBS] float32


def padded_vocab(model: Model) -> int:
    """The vocabulary as the logits have it (padded to a multiple of its mesh axis)."""
    return int(model.params["embed"].shape[0])


class ModelRunner:
    """Holds the paged KV cache and the sampler's penalty state (``jaxllm.penalties``, one
    slot per sequence the engine can run at once) and runs steps on them (both donated:
    updated in place)."""

    def __init__(self, model: Model, policy: BucketPolicy):
        """``policy`` is the engine's configuration, its cache sized (``for_engine``)."""
        self.model = model
        self.policy = policy
        config, cache = model.config, policy.cache
        self.groups = groups = cache.groups(config)
        sharding = kv_cache_sharding(config, cache, model.mesh)
        self._new_cache = jax.jit(
            lambda: init_kv_cache(config, cache, model.mesh),
            out_shardings=[(sharding, sharding)] * groups.num_slabs)
        self.cache = self._new_cache()
        self.num_penalty_slots = policy.max_num_seqs
        shape = (self.num_penalty_slots, padded_vocab(model))
        self._new_penalties = jax.jit(lambda: init_state(*shape),
                                      out_shardings=state_sharding(*shape, model.mesh))
        self.penalties = self._new_penalties()
        self._logits, self._sample = _step_programs(model, groups)
        self._score = None
        self.mask_words = mask_words(padded_vocab(model))

    def reset_cache(self) -> None:
        """Re-creates the KV cache and the penalty state, zeroed. After a failed step the old
        buffers are donated or hold a failed computation's outputs: they are freed first and
        never read again."""
        old, self.cache, self.penalties = (self.cache, self.penalties), None, None
        for array in jax.tree.leaves(old):
            array.delete()
        self.cache = self._new_cache()
        self.penalties = self._new_penalties()

    def _batch(self, chunks: Sequence[SeqChunk]) -> StepBatch:
        policy = self.policy
        return build_step(chunks, policy.cache, width=policy.pages_per_seq,
                          num_rows=policy.token_bucket(sum(len(c.tokens) for c in chunks)),
                          num_slots=policy.batch_bucket(len(chunks)),
                          group_chunk=self.groups.group_chunk)

    def step(self, chunks: Sequence[SeqChunk]) -> np.ndarray:
        """Runs one step; returns float32 logits ``[len(chunks), V]`` of each last token."""
        batch = self._batch(chunks)
        logits, self.cache = self._logits(self.model.params, self.cache, batch.tokens,
                                          batch.meta, batch.logits_rows)
        return np.asarray(logits)[: batch.num_seqs, : self.model.config.vocab_size]

    def sample_step(self, chunks: Sequence[SeqChunk], sampling: Sequence[SamplingParams],
                    seeds: Sequence[int], steps: Sequence[int],
                    stop_ids: Sequence[Collection[int]] | None = None,
                    penalties: Sequence[SeqPenalty | None] | None = None,
                    token_masks: Mapping[int, np.ndarray] | None = None) -> Sampled:
        """Runs one step and picks each sequence's next token on device.

        ``seeds`` (< 2**64, all bits used) and ``steps`` (the index of the token being picked)
        key each row's sampler; ``stop_ids`` (each sequence's, EOS included) are held back
        until its ``min_tokens``; ``penalties`` give each sequence that uses a penalty its
        slot of the penalty state (None: none); ``token_masks`` maps a sequence's index to
        its allowed tokens (``[mask_words]`` int32 bits; structured outputs).
        """
        inputs = self.prepare(chunks, sampling, seeds, steps, stop_ids, penalties, token_masks)
        return self.run(inputs, len(chunks))

    def sample_and_score_step(self, chunks: Sequence[SeqChunk],
                              sampling: Sequence[SamplingParams], seeds: Sequence[int],
                              steps: Sequence[int], targets: Sequence[int],
                              stop_ids: Sequence[Collection[int]] | None = None,
                              penalties: Sequence[SeqPenalty | None] | None = None,
                              token_masks: Mapping[int, np.ndarray] | None = None
                              ) -> tuple[Sampled, Scored]:
        """``sample_step``, and the log-probability of ``targets[t]`` (the token after row t,
        -1 for none) under each row's distribution, with the top alternatives."""
        inputs = self.prepare(chunks, sampling, seeds, steps, stop_ids, penalties, token_masks)
        rows = target_rows(inputs, targets)
        return self.run_scored(inputs, rows, len(chunks), len(targets))

    def prepare(self, chunks: Sequence[SeqChunk], sampling: Sequence[SamplingParams],
                seeds: Sequence[int], steps: Sequence[int],
                stop_ids: Sequence[Collection[int]] | None = None,
                penalties: Sequence[SeqPenalty | None] | None = None,
                token_masks: Mapping[int, np.ndarray] | None = None) -> StepInputs:
        """The step's host arrays, padded to its buckets and checked (``build_step``,
        ``jaxllm.penalties.build_rows``)."""
        batch = self._batch(chunks)
        slots = batch.logits_rows.shape[0]
        pad = slots - len(chunks)
        stops = None if stop_ids is None else list(stop_ids) + [()] * pad
        arrays = SamplingArrays.from_params(list(sampling) + [GREEDY] * pad, stops)
        seeds_arr = np.zeros((slots, 2), np.uint32)
        seeds_arr[: len(chunks)] = seed_words(seeds)
        steps_arr = np.zeros(slots, np.int32)
        steps_arr[: len(chunks)] = steps
        rows = build_rows(chunks, [None] * len(chunks) if penalties is None else penalties,
                          batch.tokens.shape[0], slots, self.num_penalty_slots)
        mask = np.full((slots, self.mask_words), -1, np.int32)
        for index, words in (token_masks or {}).items():
            mask[index] = words
        return StepInputs(batch.tokens, batch.meta, batch.logits_rows, arrays, seeds_arr,
                          steps_arr, rows, mask)

    def empty_inputs(self, rows: int, slots: int) -> StepInputs:
        """Zeroed inputs of a step of ``rows`` rows and ``slots`` sequence slots: the shapes
        a follower receives a step into."""
        groups, width = self.groups.num_groups, self.policy.pages_per_seq
        i32 = functools.partial(np.zeros, dtype=np.int32)
        meta = AttentionMetadata(i32(rows), i32((groups, rows)), i32((groups, slots, width)),
                                 i32(slots), i32(slots + 1), np.int32(0))
        return StepInputs(i32(rows), meta, i32(slots),
                          SamplingArrays.from_params([GREEDY] * slots),
                          np.zeros((slots, 2), np.uint32), i32(slots), no_rows(rows, slots),
                          i32((slots, self.mask_words)))

    def run(self, inputs: StepInputs, num_seqs: int) -> Sampled:
        """Runs the compiled step on ``inputs``; returns the picks of the first ``num_seqs``
        slots, checked finite. The picks are replicated, so every process reads its own copy."""
        out, self.cache, self.penalties = self._sample(self.model.params, self.cache,
                                                       self.penalties, *inputs)
        return _check_finite(Sampled(*(to_host(a)[:num_seqs] for a in out)))

    def run_scored(self, inputs: StepInputs, targets: np.ndarray, num_seqs: int,
                   num_targets: int) -> tuple[Sampled, Scored]:
        """``run``, and the scores of ``targets [rows]`` (-1: none) for the first
        ``num_targets`` rows."""
        if self._score is None:  # compiled on first use: only echo / prompt_logprobs need it
            score = scoring_step_function(self.model.graphdef, self.model.attention_impl,
                                          self.model.mesh, self.groups)
            rep = self.model.replicated()
            self._score = jax.jit(score, donate_argnums=(1, 2),
                                  in_shardings=(self.model.param_shardings, None, None)
                                  + (rep,) * 9)
        (out, scored), self.cache, self.penalties = self._score(
            self.model.params, self.cache, self.penalties, *inputs, targets)
        picked = _check_finite(Sampled(*(to_host(a)[:num_seqs] for a in out)))
        return picked, Scored(*(to_host(a)[:num_targets] for a in scored))


def target_rows(inputs: StepInputs, targets: Sequence[int]) -> np.ndarray:
    """``targets`` (the token after each row) padded with -1 (none) to the step's rows."""
    rows = np.full(inputs.tokens.shape[0], -1, np.int32)
    rows[: len(targets)] = targets
    return rows


def _check_finite(picked: Sampled) -> Sampled:
    """Raises FloatingPointError when a row's logits were not finite: a NaN or +inf logit makes
    the row's log-softmax NaN, and its picked token would be garbage."""
    bad = np.flatnonzero(~np.isfinite(picked.logprobs))
    if bad.size:
        raise FloatingPointError(f"the step produced non-finite logits for rows {bad.tolist()} "
                                 f"of {len(picked.logprobs)}")
    return picked
