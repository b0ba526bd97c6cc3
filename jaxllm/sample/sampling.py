"""Sampling parameters (shared by generate() and the server) and the jittable sampler."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxllm.sharding import LOGICAL_AXIS_RULES, axis_size, constrain

if TYPE_CHECKING:
    from jaxllm.sample.grammar import StructuredOutput

MAX_LOGIT_BIAS = 300  # entries per request (a fixed-shape array on device)
MAX_STOP_IDS = 16  # stop ids per sequence (EOS included): one fixed-shape row each


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. ``temperature == 0`` (or ``top_k == 1``) is greedy.

    Order of application: temperature, then top-k, then top-p over the top-k renormalised
    distribution, then min-p relative to the most likely token. ``top_k`` <= 0 and
    ``top_p == 1`` disable those filters. Before all of them: ``logit_bias`` and
    ``min_tokens``, then the penalties (vLLM's order and semantics; ``jaxllm.sample.penalties``):
    ``repetition_penalty`` divides a positive logit (multiplies a negative one) of every
    token seen in the prompt or the output, ``frequency_penalty`` subtracts itself times the
    token's count in the output, ``presence_penalty`` itself once if the output has it.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    # Score the prompt: each prompt token's log-probability given the tokens before it, with
    # this many top alternatives (None: off). The engine then skips the prefix cache for it.
    prompt_logprobs: int | None = None
    # (token id, bias) pairs added to the logits before picking (OpenAI's logit_bias).
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0  # the stop ids (EOS included) cannot be picked before this many tokens
    # The output must match this grammar (JSON schema, regex, choice, Lark): structured
    # outputs, ``jaxllm.sample.grammar``; the engine stops the request when the grammar ends.
    structured: StructuredOutput | None = None
    presence_penalty: float = 0.0  # in [-2, 2]
    frequency_penalty: float = 0.0  # in [-2, 2]
    repetition_penalty: float = 1.0  # > 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError(f"top_k={self.top_k} must be -1, 0 (both: off) or positive")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise ValueError(f"prompt_logprobs={self.prompt_logprobs} must be in [0, 20]")
        if self.max_tokens is not None and self.max_tokens < (
                0 if self.prompt_logprobs is not None else 1):
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1 (0 only to score "
                             "the prompt, with prompt_logprobs)")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has {len(self.logit_bias)} entries, at most "
                             f"{MAX_LOGIT_BIAS}")
        for token, bias in self.logit_bias:
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias[{token}]={bias} must be in [-100, 100]")
        if self.min_tokens < 0 or (self.max_tokens is not None
                                   and self.min_tokens > self.max_tokens):
            raise ValueError(f"min_tokens={self.min_tokens} must be in [0, max_tokens="
                             f"{self.max_tokens}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name}={getattr(self, name)} must be in [-2, 2]")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 "
                             "(and finite)")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed} must be in [0, 2**63)")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "logit_bias",
                           tuple((int(t), float(b)) for t, b in self.logit_bias))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Whether any penalty changes the logits (the request then needs a penalty slot)."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)


GREEDY = SamplingParams(temperature=0.0)


def seed_words(seeds: Sequence[int]) -> np.ndarray:
    """Seeds in [0, 2**64) as ``[B, 2]`` uint32 (high word, low word): the whole seed reaches
    the device, where int64 is off and a plain uint32 cast would drop the high bits."""
    s = np.asarray([int(x) % 2**64 for x in seeds], np.uint64).reshape(-1)
    return np.stack([(s >> np.uint64(32)).astype(np.uint32),
                     (s & np.uint64(0xFFFFFFFF)).astype(np.uint32)], axis=-1)


def seed_keys(words: jax.Array) -> jax.Array:
    """PRNG keys ``[B]`` from ``seed_words``: the threefry key of the full 64-bit seed, which
    for a seed below 2**32 is ``jax.random.PRNGKey(seed)``'s."""
    return jax.random.wrap_key_data(words, impl="threefry2x32")


class SamplingArrays(NamedTuple):
    """Per-row sampling settings as device arrays ``[B]`` (``[B, n]`` for the id lists, -1
    padded)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    bias_ids: jax.Array  # [B, MAX_LOGIT_BIAS]
    bias_values: jax.Array  # [B, MAX_LOGIT_BIAS]
    min_tokens: jax.Array  # [B]
    held_stop_ids: jax.Array  # [B, MAX_STOP_IDS]: suppressed before min_tokens
    presence_penalty: jax.Array  # [B]
    frequency_penalty: jax.Array  # [B]
    repetition_penalty: jax.Array  # [B]

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams],
                    stop_ids: Sequence[Collection[int]] | None = None) -> SamplingArrays:
        """``stop_ids``: each row's full stop set (EOS included), held back by min_tokens."""
        greedy = [p.is_greedy for p in params]
        bias_ids = np.full((len(params), MAX_LOGIT_BIAS), -1, np.int32)
        bias_values = np.zeros((len(params), MAX_LOGIT_BIAS), np.float32)
        held = np.full((len(params), MAX_STOP_IDS), -1, np.int32)
        for b, p in enumerate(params):
            for j, (token, bias) in enumerate(p.logit_bias):
                bias_ids[b, j], bias_values[b, j] = token, bias
            if p.min_tokens and stop_ids is not None:
                ids = sorted(stop_ids[b])  # at most MAX_STOP_IDS (``runtime.admission.admit``)
                held[b, : len(ids)] = ids
        return cls(
            temperature=np.asarray(
                [0.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                np.float32),
            top_k=np.asarray([max(p.top_k, 0) for p in params], np.int32),
            top_p=np.asarray([p.top_p for p in params], np.float32),
            min_p=np.asarray([p.min_p for p in params], np.float32),
            bias_ids=bias_ids,
            bias_values=bias_values,
            min_tokens=np.asarray([p.min_tokens for p in params], np.int32),
            held_stop_ids=held,
            presence_penalty=np.asarray([p.presence_penalty for p in params], np.float32),
            frequency_penalty=np.asarray([p.frequency_penalty for p in params], np.float32),
            repetition_penalty=np.asarray([p.repetition_penalty for p in params], np.float32),
        )


def adjust_logits(logits: jax.Array, s: SamplingArrays, steps: jax.Array) -> jax.Array:
    """``logits [B, V]`` with each row's logit_bias added and, while a row has generated
    fewer than ``min_tokens`` tokens (``steps``), its stop ids at -inf."""
    vocab = logits.shape[-1]
    rows = jnp.arange(logits.shape[0])[:, None]
    ids = jnp.where(s.bias_ids >= 0, s.bias_ids, vocab)  # padding lands out of range: dropped
    logits = logits.at[rows, ids].add(s.bias_values, mode="drop")
    early = (steps < s.min_tokens)[:, None] & (s.held_stop_ids >= 0)
    return logits.at[rows, jnp.where(early, s.held_stop_ids, vocab)].set(-jnp.inf, mode="drop")


def mask_words(vocab: int) -> int:
    """Words of a token bitmask over ``vocab`` tokens (32 tokens per int32 word)."""
    return -(-vocab // 32)


def apply_token_mask(logits: jax.Array, words: jax.Array, mesh: Mesh | None = None
                     ) -> jax.Array:
    """``logits [B, V]`` with every token a row's bitmask leaves out at -inf (structured
    outputs): ``words [B, mask_words(V)]`` int32, bit ``t % 32`` of word ``t // 32`` set when
    token t is allowed; a row of all-ones words is unconstrained. Each vocabulary shard reads
    the bits of its own slice; a batch with no constrained row skips it (``lax.cond``)."""
    vocab_axis = LOGICAL_AXIS_RULES["vocab"]
    n = axis_size(mesh, vocab_axis)
    sharded = n > 1 and logits.shape[-1] % n == 0

    def local(block, words):
        first = jax.lax.axis_index(vocab_axis) * block.shape[-1] if sharded else 0
        ids = first + jnp.arange(block.shape[-1])
        bits = (jnp.take(words, ids // 32, axis=1) >> (ids % 32)) & 1
        return jnp.where(bits == 1, block, -jnp.inf)

    def pinned(x):
        # Both branches and the result stay split over the vocabulary: left unpinned, the
        # verifying step's masked later positions were gathered whole on every device.
        return constrain(x, (None, "vocab"), mesh) if sharded else x

    def masked(_):
        if not sharded:
            return local(logits, words)
        return pinned(jax.shard_map(local, mesh=mesh,
                                    in_specs=(PartitionSpec(None, vocab_axis), PartitionSpec()),
                                    out_specs=PartitionSpec(None, vocab_axis))(logits, words))

    return pinned(jax.lax.cond(jnp.any(words != -1), masked, lambda _: pinned(logits), None))


def greedy(logits: jax.Array, mesh: Mesh | None = None) -> jax.Array:
    """Argmax over the vocabulary of ``logits [B, V]``; on a vocab-sharded mesh, each shard
    reduces its own slice and only one (max, index) pair per shard crosses devices."""
    vocab_axis = LOGICAL_AXIS_RULES["vocab"]
    n = axis_size(mesh, vocab_axis)
    if n == 1 or logits.shape[-1] % n:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def local(block):
        rows = block.shape[-1]
        idx = jnp.argmax(block, axis=-1)
        best = jnp.take_along_axis(block, idx[:, None], axis=-1)[:, 0]
        first = jax.lax.axis_index(vocab_axis) * rows
        bests = jax.lax.all_gather(best, vocab_axis, axis=1)  # [B, n]
        ids = jax.lax.all_gather(idx + first, vocab_axis, axis=1)
        winner = jnp.argmax(bests, axis=-1)  # first shard wins ties, as in a plain argmax
        return jnp.take_along_axis(ids, winner[:, None], axis=-1)[:, 0].astype(jnp.int32)

    # Every shard computes the same winner from the gathered pairs: replicated by construction.
    return jax.shard_map(local, mesh=mesh, in_specs=PartitionSpec(None, vocab_axis),
                         out_specs=PartitionSpec(), check_vma=False)(logits)


def filtered_logits(logits: jax.Array, s: SamplingArrays) -> tuple[jax.Array, jax.Array]:
    """Temperature-scaled logits sorted descending with filtered entries at -inf, and the
    vocabulary ids of that order: ``([B, V], [B, V])``."""
    temperature = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1) / temperature
    rank = jnp.arange(logits.shape[-1])[None, :]
    top_k = s.top_k[:, None]
    sorted_logits = jnp.where((top_k <= 0) | (rank < top_k), sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < s.top_p[:, None]
    keep &= probs >= s.min_p[:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)
    return jnp.where(keep, sorted_logits, -jnp.inf), order


def gumbel_sample(logits: jax.Array, temperature: jax.Array, keys: jax.Array,
                  mesh: Mesh | None = None) -> jax.Array:
    """One draw per row from ``softmax(logits / temperature)`` (``temperature [B, 1]`` > 0):
    the argmax of the scaled logits plus Gumbel noise. Threefry bits are partitionable, so
    each vocabulary shard draws its own slice of the same noise and reduces it (``greedy``)."""
    noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:]))(keys)
    noise = constrain(noise, (None, "vocab"), mesh)
    return greedy(logits / temperature + noise, mesh)


def sample(logits: jax.Array, s: SamplingArrays, keys: jax.Array,
           mesh: Mesh | None = None) -> jax.Array:
    """Next token per row of ``logits [B, V]``; rows with temperature 0 are greedy.

    ``keys [B]`` are per-row PRNG keys. Only batches where some row samples do more than the
    greedy argmax (``lax.cond``). When no sampling row filters (top-k, top-p, min-p), a row
    draws by the Gumbel-max trick: the argmax of ``logits / T`` plus Gumbel noise is a draw
    from ``softmax(logits / T)``, reduced per vocabulary shard like the greedy pick, so the
    vocabulary never crosses devices. Filtering rows need the sorted vocabulary.
    """
    best = greedy(logits, mesh)
    samples = s.temperature > 0
    filters = (s.top_k > 0) | (s.top_p < 1) | (s.min_p > 0)
    temperature = jnp.where(samples, s.temperature, 1.0)[:, None]

    def gumbel_max(_):
        return jnp.where(samples, gumbel_sample(logits, temperature, keys, mesh), best)

    def filtered(_):
        masked, order = filtered_logits(logits, s)
        pick = jax.vmap(jax.random.categorical)(keys, masked)
        chosen = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
        # Rows without filters draw as they would in a batch without filtering rows: a
        # seeded request's tokens do not depend on what shares its batch.
        return jnp.where(samples & filters, chosen, gumbel_max(None))

    def sampled(_):
        return jax.lax.cond(jnp.any(samples & filters), filtered, gumbel_max, None)

    return jax.lax.cond(jnp.any(samples), sampled, lambda _: best, None)
