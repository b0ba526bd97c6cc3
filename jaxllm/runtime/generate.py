"""Batched generation: a pure, jittable prefill + ``lax.while_loop`` decode, ``generate()``
and its warm-up.

The jittable core runs the same model forward as the serving engine: one flat prefill batch
of every prompt, then one row per sequence per decode step, over a paged KV cache where
sequence b owns pages ``b * W .. b * W + W - 1`` (W = pages per sequence; the layouts are
``jaxllm.layout.prefill_layout`` and ``decode_layout``).
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.kv_cache import CacheConfig, init_kv_cache
from jaxllm.layout import (
    contiguous_num_pages,
    decode_layout,
    pages_for,
    prefill_layout,
)
from jaxllm.model.vision import ImageEmbeds
from jaxllm.runtime.admission import admit
from jaxllm.runtime.handle import Model
from jaxllm.sample.sampling import (
    GREEDY,
    MAX_STOP_IDS,
    SamplingArrays,
    SamplingParams,
    adjust_logits,
    sample,
    seed_keys,
    seed_words,
)
from jaxllm.sharding import to_host


def generate_tokens(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    lengths: jax.Array,
    seeds: jax.Array,
    budgets: jax.Array,
    stop_ids: jax.Array,
    sampling: SamplingArrays,
    images: ImageEmbeds | None = None,
    *,
    max_new_tokens: int,
    max_model_len: int,
    cache: CacheConfig,
    attention_impl: str,
) -> tuple[jax.Array, jax.Array]:
    """Generates up to ``max_new_tokens`` (static) tokens for each prompt; pure and jittable.

    tokens [B, L] int32 prompts padded on the right, lengths [B] (>= 1); seeds [B, 2] uint32
    per-row 64-bit PRNG seeds (``seed_words``); budgets [B] per-row token limits
    (<= max_new_tokens); stop_ids [B, MAX_STOP_IDS] (-1 = unused); ``images`` (optional):
    image features and, as ``rows [B, L]``, the feature row each prompt token takes (-1: its
    text embedding; ``Model.image_embeds``). A row stops after a stop
    id (which it keeps), its budget, or when it reaches ``max_model_len`` tokens. ``cache``
    gives the page size and dtype (its page count is sized here: ``B`` sequences of
    ``max_model_len``). Returns (out [B, max_new_tokens] padded with -1, number generated
    [B]).
    """
    model = nnx.merge(graphdef, params)
    batch, max_len = tokens.shape
    page_size = cache.page_size
    pages_per_seq = pages_for(max_model_len, page_size)
    kv = init_kv_cache(model.config,
                       cache.contiguous(contiguous_num_pages(1, batch, pages_per_seq)),
                       model.mesh)
    base_keys = seed_keys(seeds)

    def pick(hidden, step):  # step [B]: the index of the token being chosen in each row
        keys = jax.vmap(jax.random.fold_in)(base_keys, step)
        return sample(adjust_logits(model.logits(hidden), sampling, step), sampling, keys,
                      model.mesh)

    def finished(token, count):
        is_stop = jnp.any(token[:, None] == stop_ids, axis=-1)
        return is_stop | (count >= budgets) | (lengths + count >= max_model_len)

    row, meta = prefill_layout(lengths, max_len, pages_per_seq, page_size)
    flat = jnp.zeros(batch * max_len, jnp.int32).at[row].set(tokens, mode="drop")
    if images is not None:
        rows = jnp.full(batch * max_len, -1, jnp.int32).at[row].set(images.rows, mode="drop")
        images = images._replace(rows=rows)
    hidden, kv = model(flat, kv, meta, attention_impl=attention_impl, images=images)
    first = pick(hidden[meta.query_start_loc[1:] - 1], jnp.zeros(batch, jnp.int32))
    out = jnp.full((batch, max_new_tokens), -1, jnp.int32).at[:, 0].set(first)
    count = jnp.ones(batch, jnp.int32)
    state = (out, count, first, finished(first, count), kv)

    def cond(state):
        _, count, _, done, _ = state
        return jnp.any(~done) & (jnp.max(count) < max_new_tokens)

    def body(state):
        out, count, last, done, kv = state
        # The last generated token sits at position lengths + count - 1.
        meta = decode_layout(lengths + count - 1, ~done, pages_per_seq, page_size)
        hidden, kv = model(last, kv, meta, attention_impl=attention_impl)
        token = pick(hidden, count)
        slot = jnp.where(done, max_new_tokens, count)
        out = out.at[jnp.arange(batch), slot].set(token, mode="drop")
        count = count + (~done)
        return out, count, jnp.where(done, last, token), done | finished(token, count), kv

    out, count, _, _, _ = jax.lax.while_loop(cond, body, state)
    return out, count


def generate(
    model: Model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    stop_token_ids: Sequence[int] | None = None,
    images: Sequence[Any | None] | None = None,
) -> list[list[int]]:
    """Generated ids of each prompt (stop token included), greedy when ``sampling`` is None.

    ``images[b]`` (optional, one entry per prompt): the tiles ``[N_b, C, S, S]`` of prompt
    b's images in prompt order, e.g. ``np.concatenate([p.pixel_values for p in processed])``
    from ``jaxllm.multimodal.processor``, or None. Prompt b must hold exactly
    ``N_b * tokens_per_tile`` ``<|patch|>`` tokens (``jaxllm.multimodal.prompt.expand_prompt``).

    Stops at EOS (``generation_config.json``), a stop id, ``max_new_tokens`` or
    ``max_model_len``. Prompts of any lengths run in bucketed batches of at most
    ``max_num_seqs``; a prompt + ``max_new_tokens`` over ``max_model_len`` is refused.
    """
    sampling = GREEDY if sampling is None else sampling
    if sampling.structured is not None:
        raise ValueError("generate() does not constrain outputs to a grammar: structured "
                         "outputs need the engine (jaxllm.engine.Engine, or the server)")
    if sampling.has_penalties:
        raise ValueError("generate() does not apply presence_penalty, frequency_penalty or "
                         "repetition_penalty: run the request through jaxllm.engine.Engine "
                         "(or the server), which does")
    policy = model.bucket_policy
    # One admission per prompt (``jaxllm.runtime.admission.admit``, as the engine's), sharing
    # the stop set and the seed: prompt b of the batch draws from seed + b.
    sampling = dataclasses.replace(
        sampling, max_tokens=max_new_tokens,
        stop_token_ids=tuple(sampling.stop_token_ids) + tuple(stop_token_ids or ()))
    seed = secrets.randbits(63)
    admitted = [admit(prompt, sampling, policy, vocab_size=model.config.vocab_size,
                      eos_token_ids=model.eos_token_ids, seed=seed) for prompt in prompts]
    checked = [np.asarray(a.prompt, np.int32) for a in admitted]
    stops = sorted(admitted[0].stop_ids) if admitted else []
    seed = admitted[0].sampling.seed if admitted else seed
    if images is not None and len(images) != len(checked):
        raise ValueError(f"{len(images)} image entries for {len(checked)} prompts")

    results: list[list[int]] = []
    for start in range(0, len(checked), policy.max_num_seqs):
        group = checked[start : start + policy.max_num_seqs]
        pixels = None if images is None else images[start : start + policy.max_num_seqs]
        out, count = run_generate(model, group, max_new_tokens, stops, sampling, seed + start,
                                  pixels)
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
    seeds = seed_words([seed + b for b in range(batch)])
    arrays = SamplingArrays.from_params([sampling] * batch, [stops] * batch)
    return tokens, lengths, seeds, budgets, stop_ids, arrays


def run_generate(model: Model, prompts: Sequence[np.ndarray], max_new_tokens: int,
                 stops: Sequence[int], sampling: SamplingParams,
                 seed: int, images: Sequence[Any | None] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One bucketed batch through the compiled generation program (host arrays out)."""
    policy = model.bucket_policy
    batch = policy.batch_bucket(len(prompts))
    length = policy.length_bucket(max(len(p) for p in prompts))
    inputs = pack_inputs(prompts, batch, length, max_new_tokens, stops, sampling, seed)
    embeds = None if images is None else model.image_embeds(prompts, images, (batch, length))
    return _call_generate(model, inputs, embeds)


def _call_generate(model: Model, inputs: tuple[np.ndarray, ...], embeds: ImageEmbeds | None
                   ) -> tuple[np.ndarray, np.ndarray]:
    out, count = model.compiled("generate", lambda: _compile_generate(model))(
        model.params, *inputs, embeds)
    return to_host(out), to_host(count)


def _compile_generate(model: Model):
    policy = model.bucket_policy
    fn = functools.partial(
        generate_tokens, model.graphdef, max_new_tokens=max(1, policy.max_model_len - 1),
        max_model_len=policy.max_model_len, cache=policy.cache,
        attention_impl=model.attention_impl)
    rep = model.replicated()
    return jax.jit(fn, in_shardings=(model.param_shardings,) + (rep,) * 7, out_shardings=rep)


def warmup(model: Model, progress: bool = True, max_tiles: int | None = None) -> int:
    """Compiles generation for every (batch, prompt length) bucket; returns how many programs.

    Afterwards no ``generate()`` call within ``max_num_seqs`` and ``max_model_len``
    compiles anything. With ``max_tiles`` (a model with a vision tower) also the image
    variant of each bucket and the encoder for up to ``max_tiles`` tiles per batch, so calls
    with images compile nothing either.
    """
    from tqdm import tqdm

    policy = model.bucket_policy
    shapes = [(b, n) for b in policy.batch_buckets for n in policy.length_buckets]
    variants = [False] + [True] * (max_tiles is not None)
    if max_tiles is not None:
        vision = model.require_vision()
        for tiles in tqdm(_powers_of_two(max_tiles), desc="warmup encoder", unit="program",
                          disable=not progress):
            model.encode_images(np.zeros((tiles, vision.num_channels, vision.image_size,
                                          vision.image_size), np.float32))
    for batch, length in tqdm(shapes, desc="warmup", unit="program", disable=not progress):
        # The longest prompt a bucket holds; max_model_len itself leaves no room to generate.
        prompts = [np.zeros(min(length, policy.max_model_len - 1), np.int32)] * batch
        length = policy.length_bucket(len(prompts[0]))  # as run_generate buckets it
        inputs = pack_inputs(prompts, batch, length, 1, list(model.eos_token_ids), GREEDY, 0)
        for with_images in variants:
            embeds = None if not with_images else ImageEmbeds(
                np.zeros((batch * length, model.config.hidden_size), model.dtype),
                np.full((batch, length), -1, np.int32))
            _call_generate(model, inputs, embeds)
    extra = len(_powers_of_two(max_tiles)) if max_tiles is not None else 0
    return len(shapes) * len(variants) + extra


def _powers_of_two(limit: int) -> list[int]:
    """1, 2, 4, ... up to the bucket that holds ``limit``."""
    return [1 << i for i in range(max(limit - 1, 0).bit_length() + 1)]
