"""The compiled step's contract: its inputs (``StepInputs``, one pytree with one abstract
spec) and the pure functions jitted over them (by the runner, and ahead of time by
``jaxllm.aot``).

A step runs every scheduled sequence's piece (prefill piece or decode row) through the model
with the KV cache and the penalty state donated, and picks each sequence's next token on the
device. A decode row whose input token the previous step picked and the host has not seen yet
(async scheduling) names that step's pick (``from_last``): the device takes it from the
previous step's picks, which stay on the device (``last_tokens``, ``max_num_seqs`` wide).

Glossary: T flat rows, S sequence slots of the step, N ``max_num_seqs`` (last picks), V
padded vocabulary, G layer groups, W block-table width.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm.kv_cache import LayerGroups
from jaxllm.layout import AttentionMetadata
from jaxllm.model.vision import ImageEmbeds
from jaxllm.multimodal.feeder import unpack_features
from jaxllm.sample.penalties import PenaltyRows, PenaltyState, no_rows, penalize
from jaxllm.sample.sampling import (
    GREEDY,
    SamplingArrays,
    adjust_logits,
    apply_token_mask,
    sample,
    seed_keys,
)
from jaxllm.sample.verify_step import verify_pick

if TYPE_CHECKING:
    from jaxllm.engine.spec_decode.eagle import EagleDrafter

TOP_LOGPROBS = 20  # the most the OpenAI API asks for
# Constrained sequences (structured outputs) that one verifying step takes drafts from: their
# grammar masks past the first position travel in a [MASKED_DRAFTERS, k, words] array, so a
# step's host-to-device bytes do not grow with the batch (a Scout vocabulary's masks for
# 256 sequences would be 6.5 MB a position). More constrained sequences draft next step.
MASKED_DRAFTERS = 8
SCORE_BLOCK = 256  # rows whose full-vocabulary log-probabilities exist at once


class StepInputs(NamedTuple):
    """The host arrays of one step; their shapes depend only on the step's (token bucket,
    batch bucket), so followers of a multi-process engine can receive them. The order of
    the fields is the order everywhere (the jitted functions take the whole tuple)."""

    tokens: np.ndarray  # [T] int32 (a row fed from the last step's picks: any value)
    from_last: np.ndarray  # [T] int32: the last step's sequence slot whose pick row t takes; -1
    meta: AttentionMetadata
    logits_rows: np.ndarray  # [S] int32: each sequence's last row
    sampling: SamplingArrays  # [S] rows
    seeds: np.ndarray  # [S, 2] uint32: each 64-bit seed's words (``seed_words``)
    steps: np.ndarray  # [S] int32: the index of the token each sequence picks
    penalty_rows: PenaltyRows  # which penalty slots this step records into and reads
    # [S, ceil(V / 32)] int32: each row's allowed tokens as bits (structured outputs; all
    # ones: unconstrained), ``jaxllm.sample.sampling.apply_token_mask``.
    token_mask: np.ndarray
    targets: np.ndarray  # [T] int32: the token after row t to score (prompt_logprobs); -1
    # Speculative decoding (``jaxllm.engine.spec_decode``), k drafts a sequence at most (k = 0
    # without): a speculating sequence's piece ends in its last token and its drafts.
    draft_tokens: np.ndarray  # [S, k] int32: the drafts, -1 past num_drafts
    num_drafts: np.ndarray  # [S] int32: 0 for a sequence that does not speculate this step
    # [S, k + 1] int32: the flat row scored at each position (the last token's row, then each
    # draft's); positions past num_drafts repeat the piece's last row.
    verify_rows: np.ndarray
    # [MASKED_DRAFTERS, k, ceil(V / 32)] int32: the allowed tokens at positions 1..k of the
    # constrained sequences that draft (the grammar advanced over the drafts before each),
    # and [S] int32 each slot's index into it (-1: positions past 0 unconstrained).
    draft_masks: np.ndarray
    draft_mask_index: np.ndarray
    # [S] int32: the token after a slot's last row when the host knows it (a prompt chunk
    # short of the prompt's end), else -1 (the step picks it). An EAGLE-3 head pairs each
    # row with the token after it (``jaxllm.engine.spec_decode.eagle``).
    next_tokens: np.ndarray
    # Images (``jaxllm.multimodal.feeder``): the feature row each flat row takes in place of
    # its text embedding (-1: none), and the step's features as 4-byte words ([0, W] in a
    # step without images, else [T, W]; W = ``feature_words``).
    image_rows: np.ndarray  # [T] int32
    image_features: np.ndarray  # [0 or T, W] uint32

    @property
    def has_images(self) -> bool:
        """Whether the step brings image features (the image variant of its program)."""
        return self.image_features.shape[0] > 0

    @property
    def scores(self) -> bool:
        """Whether some row is scored (the scoring program runs the step)."""
        return bool(np.any(self.targets >= 0))

    @property
    def speculates(self) -> bool:
        """Whether some sequence brings drafts (the verifying program runs the step)."""
        return bool(np.any(self.num_drafts > 0))

    @property
    def num_seqs(self) -> int:
        return int(self.meta.num_seqs)


def step_spec(rows: int, slots: int, num_groups: int, width: int, mask_words: int,
              num_speculative: int = 0, feature_words: int = 0,
              images: bool = False) -> StepInputs:
    """The abstract ``StepInputs`` (``jax.ShapeDtypeStruct`` leaves) of a step of ``rows``
    rows and ``slots`` sequence slots, ``num_speculative`` drafts a sequence at most, image
    features of ``feature_words`` words a row (``images``: the step brings some): the one
    statement of every input's shape and dtype."""
    i32 = functools.partial(jax.ShapeDtypeStruct, dtype=np.int32)
    meta = AttentionMetadata(i32((rows,)), i32((num_groups, rows)),
                             i32((num_groups, slots, width)), i32((slots,)), i32((slots + 1,)),
                             i32(()))
    sampling = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                            SamplingArrays.from_params([GREEDY] * slots))
    penalty_rows = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                no_rows(rows, slots))
    return StepInputs(i32((rows,)), i32((rows,)), meta, i32((slots,)), sampling,
                      jax.ShapeDtypeStruct((slots, 2), np.uint32), i32((slots,)),
                      penalty_rows, i32((slots, mask_words)), i32((rows,)),
                      i32((slots, num_speculative)), i32((slots,)),
                      i32((slots, num_speculative + 1)),
                      i32((MASKED_DRAFTERS, num_speculative, mask_words)), i32((slots,)),
                      i32((slots,)), i32((rows,)),
                      jax.ShapeDtypeStruct((rows if images else 0, feature_words), np.uint32))


def zeros_like_spec(spec: StepInputs) -> StepInputs:
    """Host arrays of ``spec``'s shapes (what a follower receives a step into)."""
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), spec)


class Sampled(NamedTuple):
    """One step's picks, per sequence: token, its log-probability, and the top alternatives."""

    tokens: np.ndarray  # [S] int32
    logprobs: np.ndarray  # [S] float32
    top_ids: np.ndarray  # [S, TOP_LOGPROBS] int32
    top_logprobs: np.ndarray  # [S, TOP_LOGPROBS] float32
    drafts: np.ndarray | None = None  # [S, k] int32: EAGLE-3's drafts for the next step


class Emitted(NamedTuple):
    """A verifying step's picks, per sequence: the accepted drafts and the token after them
    (``jaxllm.sample.verify``), each with its log-probability and the top alternatives."""

    tokens: np.ndarray  # [S, k + 1] int32: num_accepted + 1 tokens, then -1
    logprobs: np.ndarray  # [S, k + 1] float32 (0 past the emitted tokens)
    top_ids: np.ndarray  # [S, k + 1, TOP_LOGPROBS] int32
    top_logprobs: np.ndarray  # [S, k + 1, TOP_LOGPROBS] float32
    num_accepted: np.ndarray  # [S] int32
    drafts: np.ndarray | None = None  # [S, k] int32: EAGLE-3's drafts for the next step


class Scored(NamedTuple):
    """Per flat row: the log-probability of the token that follows it, and the top ones."""

    logprobs: np.ndarray  # [rows] float32 (0 where there is no following token)
    top_ids: np.ndarray  # [rows, TOP_LOGPROBS] int32
    top_logprobs: np.ndarray  # [rows, TOP_LOGPROBS] float32


def pick(logits: jax.Array, inputs: StepInputs, tokens: jax.Array, mesh: Mesh | None,
         penalties: PenaltyState) -> tuple[tuple[jax.Array, ...], PenaltyState]:
    """Each sequence's next token, its log-probability and the top alternatives; and the
    penalty state with the step's ``tokens`` recorded. Order (vLLM's): logit_bias and
    min_tokens, then the penalties, then temperature and the filters."""
    s = inputs.sampling
    # A row's key depends only on its request's seed and token index, so a seeded
    # request samples the same tokens whatever else shares its batch.
    keys = jax.vmap(jax.random.fold_in)(seed_keys(inputs.seeds), inputs.steps)
    adjusted, penalties = penalize(
        adjust_logits(logits, s, inputs.steps), penalties, inputs.penalty_rows, tokens,
        s.presence_penalty, s.frequency_penalty, s.repetition_penalty, mesh)
    # Structured outputs: tokens outside a constrained row's grammar can never be picked.
    adjusted = apply_token_mask(adjusted, inputs.token_mask, mesh)
    picked = sample(adjusted, s, keys, mesh)
    # Log-probabilities under the model's own distribution (before temperature and
    # filters), for the chosen token and the TOP_LOGPROBS most likely ones.
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, picked[:, None], axis=-1)[:, 0]
    top_values, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
    return (picked, chosen, top_ids, top_values), penalties


def step_function(graphdef: nnx.GraphDef, attention_impl: str, mesh: Mesh | None,
                  groups: LayerGroups, *, scores: bool = False,
                  speculative: bool = False, drafter: EagleDrafter | None = None) -> Callable:
    """The step as a pure function, for the runner's jit and for compiling it ahead of time:

    ``(params, cache, penalties, last_tokens [N], inputs, head_params) -> (picked, scored,
    cache, penalties, last_tokens, drafts)``; ``picked`` is (tokens, logprobs, top ids, top
    logprobs) per sequence slot, ``last_tokens`` the picks padded to N for the next step's
    ``from_last``. With ``scores``, ``scored`` holds per row the log-probability of
    ``inputs.targets`` and the top alternatives, computed ``SCORE_BLOCK`` rows at a time
    (memory independent of the step's width); without, it is None.

    With an EAGLE-3 ``drafter`` the cache's last slab is the head's, ``head_params`` its
    parameters: the target also returns the head's features, and after the picks the head
    runs over the step's rows and drafts ``[S, k]`` for the next step (``drafts``; None
    without a drafter).
    """
    aux_layers = drafter.aux_layers if drafter is not None else ()

    def run(params, cache, penalties, last_tokens, inputs: StepInputs, head_params=None):
        module = nnx.merge(graphdef, params)
        fed = last_tokens[jnp.maximum(inputs.from_last, 0)]
        tokens = jnp.where(inputs.from_last >= 0, fed, inputs.tokens)
        images = None
        if inputs.image_features.shape[0]:  # static: the image variant of the program
            images = ImageEmbeds(unpack_features(inputs.image_features, module.embed[...].dtype),
                                 inputs.image_rows)
        target_cache = cache if drafter is None else cache[:-1]
        hidden, target_cache, features = module.forward(
            tokens, target_cache, inputs.meta, attention_impl=attention_impl, groups=groups,
            images=images, aux_layers=aux_layers)
        if speculative:
            picked, penalties = verify_pick(module, hidden, inputs, tokens, mesh, penalties,
                                             TOP_LOGPROBS)
            accepted = picked[-1][:, None]
            final = jnp.take_along_axis(picked[0], accepted, axis=1)[:, 0]
            last_row = jnp.take_along_axis(inputs.verify_rows, accepted, axis=1)[:, 0]
        else:
            picked, penalties = pick(module.logits(hidden[inputs.logits_rows]), inputs,
                                     tokens, mesh, penalties)
            final, last_row = picked[0], inputs.logits_rows
        slots = final.shape[0]
        last = jnp.zeros_like(last_tokens).at[:slots].set(final[: last_tokens.shape[0]])
        scored = _score(module, hidden, inputs.targets) if scores else None
        drafts = None
        if drafter is not None:
            after = jnp.where(inputs.next_tokens >= 0, inputs.next_tokens, final)
            drafts, head_cache = drafter.run(head_params, module, cache[-1], inputs.meta,
                                             tokens, features, after, last_row,
                                             attention_impl=attention_impl)
            target_cache = [*target_cache, head_cache]
        return picked, scored, target_cache, penalties, last, drafts

    return run


def _score(module, hidden: jax.Array, targets: jax.Array) -> tuple[jax.Array, ...]:
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
    return jax.tree.map(lambda a: a.reshape(rows, *a.shape[2:]), scored)
