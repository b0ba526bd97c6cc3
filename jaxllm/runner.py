"""One engine step: a flat batch of rows from many sequences over a persistent paged cache.

The scheduler (later) decides which tokens of which sequences run; ``build_step`` turns that
into bucketed, range-checked arrays; ``ModelRunner.step`` runs the one model forward with the
KV cache donated, so the pages are updated in place from step to step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.batch import check_token_ids
from jaxllm.buckets import BucketPolicy
from jaxllm.model import KV_CACHE_AXES, AttentionMetadata, init_kv_cache
from jaxllm.sampling import GREEDY, SamplingArrays, SamplingParams, sample
from jaxllm.sharding import named_sharding

if TYPE_CHECKING:
    from jaxllm.api import Model


@dataclasses.dataclass(frozen=True)
class SeqChunk:
    """The next tokens of one sequence: ``num_cached`` tokens are already in its pages."""

    pages: Sequence[int]  # the sequence's pages in position order (its block-table row)
    num_cached: int
    tokens: Sequence[int]


@dataclasses.dataclass(frozen=True)
class StepBatch:
    tokens: np.ndarray  # [T] int32, T a token bucket
    positions: np.ndarray  # [T] int32
    meta: AttentionMetadata  # numpy arrays; S (sequence slots) a batch bucket
    logits_rows: np.ndarray  # [S] row of each sequence's last token (0 for padding slots)
    num_seqs: int


def build_step(chunks: Sequence[SeqChunk], policy: BucketPolicy, num_pages: int,
               vocab_size: int) -> StepBatch:
    """Flat-batch arrays for ``chunks``; every index is checked here, before any device work.

    Sequence s's new token i sits at position ``num_cached + i`` in cache slot
    ``pages[pos // page_size] * page_size + pos % page_size``; the block-table row is padded
    with page 0 to exactly ``policy.pages_per_seq`` columns (masks keep padding unread).
    """
    if not chunks:
        raise ValueError("a step needs at least one sequence")
    width, page = policy.pages_per_seq, policy.page_size
    for s, c in enumerate(chunks):
        _check_chunk(s, c, policy, num_pages)
    rows = sum(len(c.tokens) for c in chunks)
    num_rows = policy.token_bucket(rows)
    num_slots = policy.batch_bucket(len(chunks))
    tokens = np.zeros(num_rows, np.int32)
    positions = np.zeros(num_rows, np.int32)
    slots = np.full(num_rows, -1, np.int32)
    tables = np.zeros((num_slots, width), np.int32)
    seq_lens = np.zeros(num_slots, np.int32)
    starts = np.zeros(num_slots + 1, np.int32)
    last = np.zeros(num_slots, np.int32)
    row = 0
    for s, c in enumerate(chunks):
        n, end = len(c.tokens), c.num_cached + len(c.tokens)
        pages = np.asarray(c.pages, np.int64)
        pos = np.arange(c.num_cached, end)
        tokens[row : row + n] = check_token_ids(list(c.tokens), vocab_size)
        positions[row : row + n] = pos
        slots[row : row + n] = pages[pos // page] * page + pos % page
        tables[s, : len(pages)] = pages
        seq_lens[s] = end
        row += n
        starts[s + 1] = row
        last[s] = row - 1
    starts[len(chunks) + 1 :] = row
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, seq_lens=seq_lens,
                             query_start_loc=starts, num_seqs=np.int32(len(chunks)))
    return StepBatch(tokens, positions, meta, last, len(chunks))


def _check_chunk(s: int, c: SeqChunk, policy: BucketPolicy, num_pages: int) -> None:
    end, page, width = c.num_cached + len(c.tokens), policy.page_size, policy.pages_per_seq
    if len(c.tokens) < 1 or c.num_cached < 0:
        raise ValueError(f"sequence {s}: needs >= 1 new token and num_cached >= 0")
    policy.check_length(end)
    pages = np.asarray(c.pages, np.int64)
    if len(pages) < -(-end // page) or len(pages) > width:
        raise ValueError(f"sequence {s}: {len(pages)} pages for {end} tokens (page size "
                         f"{page}, at most {width} pages per sequence)")
    if pages.size and (pages.min() < 0 or pages.max() >= num_pages):
        raise ValueError(f"sequence {s}: page ids must be in [0, {num_pages}), got "
                         f"{pages.min()}..{pages.max()}")


TOP_LOGPROBS = 20  # the most the OpenAI API asks for


class Sampled(NamedTuple):
    """One step's picks, per sequence: token, its log-probability, and the top alternatives."""

    tokens: np.ndarray  # [S] int32
    logprobs: np.ndarray  # [S] float32
    top_ids: np.ndarray  # [S, TOP_LOGPROBS] int32
    top_logprobs: np.ndarray  # [S, TOP_LOGPROBS] float32


class ModelRunner:
    """Holds the paged KV cache and runs steps on it (cache donated: updated in place)."""

    def __init__(self, model: Model, num_pages: int, policy: BucketPolicy | None = None):
        self.model = model
        self.num_pages = num_pages
        self.policy = policy or model.bucket_policy
        config = model.config
        shape = (num_pages, model.page_size, config.num_kv_heads, config.head_dim)
        cache_sharding = named_sharding(KV_CACHE_AXES, shape, model.mesh)
        self.cache = jax.jit(
            lambda: init_kv_cache(config, num_pages, model.page_size, model.dtype, model.mesh),
            out_shardings=[(cache_sharding, cache_sharding)] * config.num_layers)()
        graphdef, impl, mesh = model.graphdef, model.attention_impl, model.mesh

        def forward(params, cache, tokens, positions, meta, logits_rows):
            module = nnx.merge(graphdef, params)
            hidden, cache = module(tokens, positions, cache, meta, attention_impl=impl)
            return module.logits(hidden[logits_rows]), cache

        def forward_and_sample(params, cache, tokens, positions, meta, logits_rows, sampling,
                               seeds, steps):
            logits, cache = forward(params, cache, tokens, positions, meta, logits_rows)
            # A row's key depends only on its request's seed and token index, so a seeded
            # request samples the same tokens whatever else shares its batch.
            keys = jax.vmap(jax.random.fold_in)(jax.vmap(jax.random.PRNGKey)(seeds), steps)
            tokens = sample(logits, sampling, keys, mesh)
            # Log-probabilities under the model's own distribution (before temperature and
            # filters), for the chosen token and the TOP_LOGPROBS most likely ones.
            logprobs = jax.nn.log_softmax(logits, axis=-1)
            chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
            top_values, top_ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
            return (tokens, chosen, top_ids, top_values), cache

        rep = model.replicated()
        self._logits = jax.jit(forward, donate_argnums=(1,),
                               in_shardings=(model.param_shardings, None) + (rep,) * 4)
        self._sample = jax.jit(forward_and_sample, donate_argnums=(1,),
                               in_shardings=(model.param_shardings, None) + (rep,) * 7)

    def _batch(self, chunks: Sequence[SeqChunk]) -> StepBatch:
        return build_step(chunks, self.policy, self.num_pages, self.model.config.vocab_size)

    def step(self, chunks: Sequence[SeqChunk]) -> np.ndarray:
        """Runs one step; returns float32 logits ``[len(chunks), V]`` of each last token."""
        batch = self._batch(chunks)
        logits, self.cache = self._logits(self.model.params, self.cache, batch.tokens,
                                          batch.positions, batch.meta, batch.logits_rows)
        return np.asarray(logits)[: batch.num_seqs, : self.model.config.vocab_size]

    def sample_step(self, chunks: Sequence[SeqChunk], sampling: Sequence[SamplingParams],
                    seeds: Sequence[int], steps: Sequence[int]) -> Sampled:
        """Runs one step and picks each sequence's next token on device.

        ``seeds`` and ``steps`` (the index of the token being picked) key each row's sampler.
        """
        batch = self._batch(chunks)
        slots = batch.logits_rows.shape[0]
        pad = slots - len(chunks)
        arrays = SamplingArrays.from_params(list(sampling) + [GREEDY] * pad)
        seeds_arr = np.zeros(slots, np.uint32)
        seeds_arr[: len(chunks)] = np.asarray(seeds, np.uint64).astype(np.uint32)
        steps_arr = np.zeros(slots, np.int32)
        steps_arr[: len(chunks)] = steps
        out, self.cache = self._sample(self.model.params, self.cache, batch.tokens,
                                       batch.positions, batch.meta, batch.logits_rows,
                                       arrays, seeds_arr, steps_arr)
        n = batch.num_seqs
        return Sampled(*(np.asarray(a)[:n] for a in out))
