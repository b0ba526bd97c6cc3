"""The runner: executes steps over a persistent paged cache. Nothing else.

The scheduler decides which tokens of which sequences run; ``jaxllm.engine.batch`` turns them
into a step's ``StepInputs`` (``jaxllm.engine.step``); ``ModelRunner.run`` dispatches the
compiled step with the KV cache, the penalty state and the last step's picks donated (updated
in place from step to step) and returns at once: the device works while the host goes on,
and ``PendingStep.result`` waits for the picks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

from jaxllm.buckets import BucketPolicy
from jaxllm.engine.step import (
    Emitted,
    Sampled,
    Scored,
    StepInputs,
    step_function,
    step_spec,
    zeros_like_spec,
)
from jaxllm.kv_cache import init_kv_cache, kv_cache_sharding
from jaxllm.layout import SeqPiece, build_step
from jaxllm.multimodal.feeder import feature_words
from jaxllm.runtime.handle import Model
from jaxllm.sample.penalties import PenaltyState, init_state, state_sharding
from jaxllm.sample.sampling import mask_words
from jaxllm.sharding import to_host

if TYPE_CHECKING:
    from jaxllm.engine.spec_decode.eagle import EagleDrafter


@dataclasses.dataclass
class PendingStep:
    """A dispatched step: its outputs are device arrays until ``result`` reads them."""

    outputs: tuple  # (picked, scored or None, EAGLE-3 drafts or None)
    num_seqs: int
    num_rows: int
    verifying: bool = False

    def result(self) -> tuple[Sampled | Emitted, Scored | None]:
        """The picks of the live sequence slots (``Emitted`` for a verifying step; with an
        EAGLE-3 head, each slot's drafts for its next step), checked finite, and (for a
        scoring step) the scores of the live rows; waits for the device. The outputs are
        replicated, so every process reads its own copy."""
        picked, scored, drafts = self.outputs
        kind = Emitted if self.verifying else Sampled
        if drafts is not None:
            picked = (*picked, drafts)
        sampled = _check_finite(kind(*(to_host(a)[: self.num_seqs] for a in picked)))
        if scored is None:
            return sampled, None
        return sampled, Scored(*(to_host(a)[: self.num_rows] for a in scored))


class ModelRunner:
    """Holds the paged KV cache, the sampler's penalty state (``jaxllm.sample.penalties``, one slot
    per batch row) and the last step's picks, and runs steps on them."""

    def __init__(self, model: Model, policy: BucketPolicy, num_speculative: int = 0,
                 drafter: EagleDrafter | None = None):
        """``policy`` is the engine's configuration, its cache sized (``for_engine``);
        ``num_speculative``: the most drafts a sequence brings to a step (0: none);
        ``drafter``: an EAGLE-3 head that drafts them in the step (its KV cache is the
        cache's last slab)."""
        self.model = model
        self.policy = policy
        self.num_speculative = num_speculative
        self.drafter = drafter
        config, cache = model.config, policy.cache
        self.groups = groups = cache.groups(config)
        self.mask_words = mask_words(model.padded_vocab)
        # 4-byte words of one image feature row in the step's inputs (0: no vision tower).
        self.feature_words = (feature_words(config.hidden_size, model.dtype)
                              if config.vision is not None else 0)
        sharding = kv_cache_sharding(config, cache, model.mesh)
        slabs = [(sharding, sharding)] * groups.num_slabs
        if drafter is None:
            self._new_cache = jax.jit(lambda: init_kv_cache(config, cache, model.mesh),
                                      out_shardings=slabs)
        else:
            head = drafter.cache_sharding(cache.num_pages)
            self._new_cache = jax.jit(
                lambda: [*init_kv_cache(config, cache, model.mesh),
                         drafter.init_cache(cache.num_pages)],
                out_shardings=[*slabs, (head, head)])
        self.num_penalty_slots = policy.max_num_seqs
        shape = (self.num_penalty_slots, model.padded_vocab)
        self._new_penalties = jax.jit(lambda: init_state(*shape),
                                      out_shardings=state_sharding(*shape, model.mesh))
        last = policy.max_num_seqs
        self._new_last = jax.jit(lambda: jax.numpy.zeros(last, np.int32),
                                 out_shardings=model.replicated())
        self.cache = self._new_cache()
        self.penalties = self._new_penalties()
        self.last_tokens = self._new_last()
        self._programs: dict[tuple[bool, bool], object] = {}

    def program(self, scores: bool, speculative: bool = False):
        """The jitted step (``scores``: the scoring step, compiled on first use: only echo /
        prompt_logprobs need it; ``speculative``: the verifying step, compiled in warm-up when
        the engine speculates), cache, penalty state and last picks donated."""
        key = (scores, speculative)
        if key not in self._programs:
            model = self.model
            fn = step_function(model.graphdef, model.attention_impl, model.mesh, self.groups,
                               scores=scores, speculative=speculative, drafter=self.drafter)
            rep = model.replicated()
            head = self.drafter.param_shardings if self.drafter is not None else None
            self._programs[key] = jax.jit(
                fn, donate_argnums=(1, 2, 3),
                in_shardings=(model.param_shardings, None, None, rep, rep, head))
        return self._programs[key]

    def spec(self, rows: int, slots: int, images: bool = False) -> StepInputs:
        return step_spec(rows, slots, self.groups.num_groups, self.policy.pages_per_seq,
                         self.mask_words, self.num_speculative, self.feature_words, images)

    def empty_inputs(self, rows: int, slots: int, images: bool = False) -> StepInputs:
        """Zeroed inputs of a step of ``rows`` rows and ``slots`` sequence slots (with image
        features: ``images``): the shapes a follower receives a step into."""
        return zeros_like_spec(self.spec(rows, slots, images))

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Projected features ``[N, tokens_per_tile, E]`` of tiles ``[N, C, S, S]``
        (``Model.encode_images``: a program per power-of-two tile count)."""
        return self.model.encode_images(pixels)

    def run(self, inputs: StepInputs) -> PendingStep:
        """Dispatches the compiled step on ``inputs`` (the scoring one when a row has a
        target; the verifying one when a sequence brings drafts) and returns without
        waiting for it."""
        speculative = inputs.speculates
        program = self.program(inputs.scores, speculative)
        head = self.drafter.params if self.drafter is not None else None
        outputs = program(self.model.params, self.cache, self.penalties, self.last_tokens,
                          inputs, head)
        picked, scored, self.cache, self.penalties, self.last_tokens, drafts = outputs
        num_seqs = inputs.num_seqs
        return PendingStep((picked, scored, drafts), num_seqs,
                           int(inputs.meta.query_start_loc[num_seqs]), speculative)

    def reset_cache(self) -> None:
        """Re-creates the KV cache, the penalty state and the last picks, zeroed. After a
        failed step the old buffers are donated or hold a failed computation's outputs: they
        are freed first and never read again."""
        old = (self.cache, self.penalties, self.last_tokens)
        self.cache, self.penalties, self.last_tokens = None, None, None
        for array in jax.tree.leaves(old):
            array.delete()
        self.cache = self._new_cache()
        self.penalties = self._new_penalties()
        self.last_tokens = self._new_last()

    def logits(self, pieces: Sequence[SeqPiece]) -> np.ndarray:
        """Runs ``pieces`` through the model and the cache; returns float32 logits
        ``[len(pieces), V]`` of each piece's last token (for tests of the cache)."""
        policy, model = self.policy, self.model
        batch = build_step(pieces, policy.cache, width=policy.pages_per_seq,
                           num_rows=policy.token_bucket(sum(len(p.tokens) for p in pieces)),
                           num_slots=policy.batch_bucket(len(pieces)),
                           group_chunk=self.groups.group_chunk)
        fn = model.compiled(("runner.logits", policy), lambda: _logits_program(self))
        logits, self.cache = fn(model.params, self.cache, batch.tokens, batch.meta,
                                batch.logits_rows)
        return np.asarray(logits)[: batch.num_seqs, : model.config.vocab_size]


def _logits_program(runner: ModelRunner):
    from flax import nnx

    model = runner.model
    graphdef, impl, groups = model.graphdef, model.attention_impl, runner.groups

    def forward(params, cache, tokens, meta, logits_rows):
        module = nnx.merge(graphdef, params)
        hidden, cache = module(tokens, cache, meta, attention_impl=impl, groups=groups)
        return module.logits(hidden[logits_rows]), cache

    rep = model.replicated()
    return jax.jit(forward, donate_argnums=(1,),
                   in_shardings=(model.param_shardings, None) + (rep,) * 3)


def step_temp_bytes(model: Model, policy: BucketPolicy, num_speculative: int = 0,
                    drafter: EagleDrafter | None = None) -> int:
    """Temporary device memory of the widest step (largest token and batch bucket), read from
    the compiled program (``memory_analysis``); compiled with abstract inputs, so nothing is
    allocated. When the engine speculates (``num_speculative`` drafts a sequence, drafted by
    ``drafter`` if an EAGLE-3 head) the larger of the plain and the verifying step's: the
    verifying step takes logits, filters and the rejection sampler over k + 1 positions a
    sequence, and with a head both run the head's drafting after the picks. Cached on the
    model per configuration."""

    def measure(speculative: bool) -> int:
        config, cache = model.config, policy.cache
        groups = cache.groups(config)
        pages = jax.ShapeDtypeStruct(cache.page_shape(config), cache.dtype,
                                     sharding=kv_cache_sharding(config, cache, model.mesh))
        slabs = [(pages, pages)] * groups.num_slabs
        head = ()
        if drafter is not None:
            head_page = jax.ShapeDtypeStruct(drafter.page_shape(cache.num_pages),
                                             drafter.cache_dtype,
                                             sharding=drafter.cache_sharding(cache.num_pages))
            slabs, head = [*slabs, (head_page, head_page)], (drafter.params,)
        shape = (policy.max_num_seqs, model.padded_vocab)
        state = PenaltyState(*(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
                               for dtype, sharding in zip(
                                   (np.int32, np.bool_),
                                   state_sharding(*shape, model.mesh), strict=True)))
        last = jax.ShapeDtypeStruct((policy.max_num_seqs,), np.int32)
        # With a vision tower the widest step is the one that brings image features.
        vision = config.vision is not None
        spec = step_spec(policy.token_buckets[-1], policy.batch_buckets[-1],
                         groups.num_groups, policy.pages_per_seq, mask_words(model.padded_vocab),
                         num_speculative,
                         feature_words=feature_words(config.hidden_size, model.dtype)
                         if vision else 0, images=vision)
        fn = step_function(model.graphdef, model.attention_impl, model.mesh, groups,
                           speculative=speculative, drafter=drafter)
        rep = model.replicated()
        shardings = (model.param_shardings, None, None, rep, rep)
        if drafter is not None:
            shardings += (drafter.param_shardings,)
        compiled = jax.jit(fn, donate_argnums=(1, 2, 3), in_shardings=shardings).lower(
            model.params, slabs, state, last, spec, *head).compile()
        return int(compiled.memory_analysis().temp_size_in_bytes)

    key = ("step_temp_bytes", policy, num_speculative,
           drafter.path if drafter is not None else None)
    return model.compiled(key, lambda: max(
        measure(speculative) for speculative in (False, True)[: 1 + bool(num_speculative)]))


def encoder_bytes(model: Model, policy: BucketPolicy, max_tiles: int) -> int:
    """Device memory of images per device: the encoder's temporaries and output at the tile
    bucket of ``max_tiles`` (read from the compiled program, nothing allocated) and the
    widest step's image features; 0 without a vision tower."""
    vision = model.config.vision
    if vision is None:
        return 0

    def measure() -> int:
        bucket = 1 << (max_tiles - 1).bit_length()
        pixels = jax.ShapeDtypeStruct((bucket, vision.num_channels, vision.image_size,
                                       vision.image_size), np.float32)
        memory = model.encoder(bucket).lower(model.params, pixels).compile().memory_analysis()
        features = (policy.token_buckets[-1] * 4
                    * feature_words(model.config.hidden_size, model.dtype))
        return int(memory.temp_size_in_bytes + memory.output_size_in_bytes + features)

    return model.compiled(("encoder_bytes", policy, max_tiles), measure)


def _check_finite(picked: Sampled | Emitted) -> Sampled | Emitted:
    """Raises FloatingPointError when a row's logits were not finite: a NaN or +inf logit makes
    the row's log-softmax NaN, and its picked token would be garbage."""
    finite = np.isfinite(picked.logprobs).reshape(len(picked.logprobs), -1)
    bad = np.flatnonzero(~finite.all(axis=1))
    if bad.size:
        raise FloatingPointError(f"the step produced non-finite logits for rows {bad.tolist()} "
                                 f"of {len(picked.logprobs)}")
    return picked
