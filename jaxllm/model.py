"""The Llama 4 text model in Flax NNX, run on a flat batch of tokens over a paged KV cache.

One forward serves every caller: ``generate()``, the serving engine and the full-sequence
test path all hand it a flat batch of T tokens with explicit positions, the per-layer paged KV
cache and the attention metadata that says which sequence owns which row.

Glossary: T flat tokens, D model, H q heads, K kv heads, d head dim, F ffn, E experts,
V vocab, P pages, p page size, S sequence slots, W block-table width, C chunk.

Every parameter declares its logical axes (``vocab``, ``embed``, ``heads``, ``kv_heads``,
``head_dim``, ``ffn``, ``experts``); ``jaxllm.sharding`` maps them to mesh axes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.attention import paged_attention
from jaxllm.config import Llama4Config, rope_inverse_frequencies
from pallas_kernels import write_kv_pages


class AttentionMetadata(NamedTuple):
    """Where each flat row lives; shapes are static per compiled program (masks carry raggedness).

    slot_mapping [T]: flat cache slot (page * p + offset) written by row t, -1 for padding.
    block_tables [S, W]: pages of each sequence slot, in position order.
    seq_lens [S]: tokens of each sequence after this step (cached + new).
    query_start_loc [S + 1]: rows of sequence s are query_start_loc[s]:query_start_loc[s + 1].
    num_seqs []: live sequence slots; rows past query_start_loc[num_seqs] are padding.
    """

    slot_mapping: jax.Array
    block_tables: jax.Array
    seq_lens: jax.Array
    query_start_loc: jax.Array
    num_seqs: jax.Array


KVCache = list[tuple[jax.Array, jax.Array]]  # per layer: (k_pages, v_pages), each [P, p, K, d]


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, scale=0.02):
    value = scale * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def _ones(shape: tuple[int, ...], axes: tuple[str, ...], dtype):
    return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)


def rms_norm(x: jax.Array, eps: float) -> jax.Array:
    """Weightless RMS normalisation in float32 (Llama 4's QK norm, and RMSNorm's core)."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.weight = _ones((dim,), ("embed",), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.eps) * self.weight[...]


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates interleaved pairs (x0, x1), (x2, x3), ... of ``x [T, H, d]`` by position."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, d/2]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def temperature_scale(positions: jax.Array, floor_scale: float, attn_scale: float) -> jax.Array:
    """Llama 4's NoPE-layer query scale: log(floor((pos + 1) / floor_scale) + 1) * s + 1."""
    pos = positions.astype(jnp.float32)
    return jnp.log1p(jnp.floor((pos + 1.0) / floor_scale)) * attn_scale + 1.0


class Attention(nnx.Module):
    def __init__(self, config: Llama4Config, layer: int, dtype, rngs: nnx.Rngs):
        c = config
        D, H, K, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        self.config, self.layer = config, layer
        self.wq = _param(rngs, (D, H, d), ("embed", "heads", "head_dim"), dtype)
        self.wk = _param(rngs, (D, K, d), ("embed", "kv_heads", "head_dim"), dtype)
        self.wv = _param(rngs, (D, K, d), ("embed", "kv_heads", "head_dim"), dtype)
        self.wo = _param(rngs, (H, d, D), ("heads", "head_dim", "embed"), dtype)
        if c.attention_bias:
            self.bq = nnx.Param(jnp.zeros((H, d), dtype), logical_axes=("heads", "head_dim"))
            self.bk = nnx.Param(jnp.zeros((K, d), dtype), logical_axes=("kv_heads", "head_dim"))
            self.bv = nnx.Param(jnp.zeros((K, d), dtype), logical_axes=("kv_heads", "head_dim"))
            self.bo = nnx.Param(jnp.zeros((D,), dtype), logical_axes=("embed",))

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache: tuple[jax.Array, jax.Array],
        meta: AttentionMetadata,
        attention_impl: str,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        c, layer = self.config, self.layer
        q = jnp.einsum("TD,DHd->THd", x, self.wq[...])
        k = jnp.einsum("TD,DKd->TKd", x, self.wk[...])
        v = jnp.einsum("TD,DKd->TKd", x, self.wv[...])
        if c.attention_bias:
            q, k, v = q + self.bq[...], k + self.bk[...], v + self.bv[...]
        if c.uses_rope(layer):
            inv_freq = jnp.asarray(rope_inverse_frequencies(c), jnp.float32)
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if c.uses_qk_norm(layer):
            q, k = rms_norm(q, c.rms_norm_eps), rms_norm(k, c.rms_norm_eps)
        if c.uses_temperature_tuning(layer):
            scale = temperature_scale(positions, c.floor_scale, c.attn_scale)
            q = (q.astype(jnp.float32) * scale[:, None, None]).astype(q.dtype)

        k_pages, v_pages = write_kv_pages(*cache, k, v, meta.slot_mapping)
        out = paged_attention(
            q, k_pages, v_pages, meta, chunk_size=c.chunk_size(layer), impl=attention_impl)
        out = jnp.einsum("THd,HdD->TD", out, self.wo[...])
        if c.attention_bias:
            out = out + self.bo[...]
        return out, (k_pages, v_pages)


class MLP(nnx.Module):
    """SwiGLU feed-forward: dense layers and the MoE shared expert."""

    def __init__(self, dim: int, hidden: int, dtype, rngs: nnx.Rngs):
        self.gate = _param(rngs, (dim, hidden), ("embed", "ffn"), dtype)
        self.up = _param(rngs, (dim, hidden), ("embed", "ffn"), dtype)
        self.down = _param(rngs, (hidden, dim), ("ffn", "embed"), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(x @ self.gate[...]) * (x @ self.up[...])
        return h @ self.down[...]


class MoE(nnx.Module):
    """Top-k sigmoid-routed experts plus an always-on shared expert.

    The routed expert sees its input already multiplied by the routing score. Tokens are
    sorted by expert and run with ``ragged_dot``, so each expert only sees its own tokens.
    """

    def __init__(self, config: Llama4Config, dtype, rngs: nnx.Rngs):
        D, F, E = config.hidden_size, config.intermediate_size, config.num_experts
        self.top_k = config.num_experts_per_tok
        self.router = _param(rngs, (D, E), ("embed", "experts"), dtype)
        self.gate = _param(rngs, (E, D, F), ("experts", "embed", "ffn"), dtype)
        self.up = _param(rngs, (E, D, F), ("experts", "embed", "ffn"), dtype)
        self.down = _param(rngs, (E, F, D), ("experts", "ffn", "embed"), dtype)
        self.shared = MLP(D, F, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        num_tokens, num_experts = x.shape[0], self.router.shape[-1]
        logits = x @ self.router[...]  # [T, E]
        top_logit, top_expert = jax.lax.top_k(logits, self.top_k)  # [T, k]
        score = jax.nn.sigmoid(top_logit.astype(jnp.float32)).astype(x.dtype)

        expert = top_expert.reshape(-1)
        order = jnp.argsort(expert, stable=True)
        token = (jnp.arange(num_tokens * self.top_k) // self.top_k)[order]
        routed_in = x[token] * score.reshape(-1)[order][:, None]
        group_sizes = jnp.bincount(expert, length=num_experts).astype(jnp.int32)

        h = jax.nn.silu(jax.lax.ragged_dot(routed_in, self.gate[...], group_sizes))
        h = h * jax.lax.ragged_dot(routed_in, self.up[...], group_sizes)
        routed_out = jax.lax.ragged_dot(h, self.down[...], group_sizes)
        out = jnp.zeros_like(x).at[token].add(routed_out)
        return out + self.shared(x)


class DecoderLayer(nnx.Module):
    def __init__(self, config: Llama4Config, layer: int, dtype, rngs: nnx.Rngs):
        D = config.hidden_size
        self.input_norm = RMSNorm(D, config.rms_norm_eps, dtype)
        self.attn = Attention(config, layer, dtype, rngs)
        self.post_attn_norm = RMSNorm(D, config.rms_norm_eps, dtype)
        if config.is_moe(layer):
            self.ffn = MoE(config, dtype, rngs)
        else:
            self.ffn = MLP(D, config.intermediate_size_mlp, dtype, rngs)

    def __call__(self, x, positions, cache, meta, attention_impl):
        attn_out, cache = self.attn(self.input_norm(x), positions, cache, meta, attention_impl)
        x = x + attn_out
        return x + self.ffn(self.post_attn_norm(x)), cache


class Llama4(nnx.Module):
    """Llama 4 text model: embedding, decoder layers, final norm, lm_head (tied or not)."""

    def __init__(self, config: Llama4Config, *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        V, D = config.vocab_size, config.hidden_size
        self.config = config
        self.embed = _param(rngs, (V, D), ("vocab", "embed"), dtype)
        self.layers = nnx.List(
            [DecoderLayer(config, i, dtype, rngs) for i in range(config.num_layers)])
        self.norm = RMSNorm(D, config.rms_norm_eps, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (D, V), ("embed", "vocab"), dtype)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        meta: AttentionMetadata,
        *,
        attention_impl: str = "xla",
    ) -> tuple[jax.Array, KVCache]:
        """Runs the flat batch ``tokens [T]`` at ``positions [T]``; returns (hidden [T, D], cache).

        The new keys/values are written into the cache before attention reads it, so a
        step's own tokens attend to each other through the same pages as to the prefix.
        """
        x = self.embed[...][tokens]
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x, layer_cache = layer(x, positions, layer_cache, meta, attention_impl)
            new_cache.append(layer_cache)
        return self.norm(x), new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Projects final hidden states ``[..., D]`` to float32 vocabulary logits."""
        head = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return jnp.einsum("...D,DV->...V", hidden, head, preferred_element_type=jnp.float32)


def init_kv_cache(config: Llama4Config, num_pages: int, page_size: int, dtype) -> KVCache:
    """Zeroed paged KV cache: one (k_pages, v_pages) pair of ``[P, p, K, d]`` per layer."""
    shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers)]
