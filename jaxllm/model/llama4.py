"""The Llama 4 text model in Flax NNX, run on a flat batch of tokens over a paged KV cache.

One forward serves every caller: ``generate()``, the serving engine and the full-sequence
test path all hand it a flat batch of T tokens with explicit positions, the per-layer paged KV
cache and the attention metadata that says which sequence owns which row.

Glossary: T flat tokens, D model, H q heads, K kv heads, d head dim, F ffn, E experts,
V vocab, P pages, p page size, S sequence slots, W block-table width, C chunk.

Every parameter declares its logical axes (``vocab``, ``embed``, ``heads``, ``kv_heads``,
``head_dim``, ``ffn``, ``experts``); ``jaxllm.sharding`` maps them to mesh axes. Feed-forward
weights may be quantized (``jaxllm.model.quant``): a ``QuantWeight`` of ``q`` and ``scale``
in place of the plain parameter, read through ``quant.matmul`` / ``quant.ragged_matmul``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from jaxllm.config import Llama4Config, rope_inverse_frequencies
from jaxllm.kv_cache import FP8_KV, KVCache, LayerGroups, layer_groups, write_kv_pages
from jaxllm.layout import AttentionMetadata
from jaxllm.model import quant as q
from jaxllm.model.attention import paged_attention
from jaxllm.model.quant import QuantConfig
from jaxllm.model.vision import ImageEmbeds, VisionModel, merge_image_embeddings
from jaxllm.sharding import constrain, logical_spec, padded_vocab_size, shard_axes


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
    """Self-attention over the paged KV cache. ``kv_scale`` (k_scale, v_scale): the
    checkpoint's calibrated per-tensor scales of an fp8 cache, which holds ``k / k_scale`` and
    ``v / v_scale`` in e4m3 (1.0 without calibration, vLLM's default); a cache in the model
    dtype ignores them."""

    def __init__(self, config: Llama4Config, layer: int, dtype, rngs: nnx.Rngs,
                 mesh: Mesh | None = None, kv_scale: tuple[float, float] = (1.0, 1.0)):
        c = config
        self.mesh = mesh
        self.kv_scale = tuple(float(s) for s in kv_scale)
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
        cache: tuple[jax.Array, jax.Array],
        meta: AttentionMetadata,
        attention_impl: str,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        c, layer, positions = self.config, self.layer, meta.positions
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

        k_scale, v_scale = self.kv_scale
        scaled = cache[0].dtype == FP8_KV and (k_scale, v_scale) != (1.0, 1.0)
        if scaled:  # q . (k_stored * k_scale) = (q * k_scale) . k_stored; V's scale after
            k, v = _divided(k, k_scale), _divided(v, v_scale)
            q = (q.astype(jnp.float32) * k_scale).astype(q.dtype)
        k_pages, v_pages = write_kv_pages(*cache, k, v, meta.slot_mapping)
        out = paged_attention(
            q, k_pages, v_pages, meta, chunk_size=c.chunk_size(layer), impl=attention_impl,
            mesh=self.mesh)
        if scaled:
            out = (out.astype(jnp.float32) * v_scale).astype(out.dtype)
        out = jnp.einsum("THd,HdD->TD", out, self.wo[...])
        if c.attention_bias:
            out = out + self.bo[...]
        return out, (k_pages, v_pages)


def _divided(x: jax.Array, scale: float) -> jax.Array:
    """``x / scale`` in float32: what an fp8 cache with that scale stores (``write_kv_pages``
    saturates and rounds it)."""
    return x.astype(jnp.float32) / scale


class MLP(nnx.Module):
    """SwiGLU feed-forward: dense layers and the MoE shared expert (quantized with ``quant``)."""

    def __init__(self, dim: int, hidden: int, dtype, rngs: nnx.Rngs,
                 quant: QuantConfig | None = None, mesh: Mesh | None = None):
        ffn = q.ffn_axis(hidden, quant, mesh)
        self.mesh = mesh
        self.gate = q.weight(rngs, (dim, hidden), ("embed", ffn), dtype, quant)
        self.up = q.weight(rngs, (dim, hidden), ("embed", ffn), dtype, quant)
        self.down = q.weight(rngs, (hidden, dim), (ffn, "embed"), dtype, quant)

    def __call__(self, x: jax.Array) -> jax.Array:
        weights = (self.gate[...], self.up[...], self.down[...])
        mesh = self.mesh
        if mesh is None or mesh.size == 1 or not q.uses_kernel(weights[0]):
            return swiglu(x, *weights)
        # A Pallas kernel is not partitioned by XLA: each device runs its ffn slice, and the
        # down projection's partial sums are added across the devices that split its rows.
        x_spec = logical_spec(("tokens", "embed"), x.shape, mesh)
        specs = tuple(q.spec_of(w, mesh) for w in (self.gate, self.up, self.down))
        fn = functools.partial(swiglu, sum_axes=shard_axes(q.leading_spec(specs[2])[:1]))
        return jax.shard_map(fn, mesh=mesh, in_specs=(x_spec, *specs), out_specs=x_spec,
                             check_vma=False)(x, *weights)


def swiglu(x: jax.Array, gate: jax.Array | q.QArray, up: jax.Array | q.QArray,
           down: jax.Array | q.QArray, sum_axes: tuple[str, ...] = ()) -> jax.Array:
    """``silu(x @ gate) * (x @ up) @ down``, summed over ``sum_axes`` (ffn split there)."""
    h = jax.nn.silu(q.matmul(x, gate)) * q.matmul(x, up)
    out = q.matmul(h, down)
    return jax.lax.psum(out, sum_axes) if sum_axes else out


class MoE(nnx.Module):
    """Top-k sigmoid-routed experts plus an always-on shared expert.

    The routed expert sees its input already multiplied by the routing score. Tokens are
    sorted by expert and run with ``ragged_dot``, so each expert only sees its own tokens.
    On a mesh, each device runs only its own experts (and its slice of the ffn dimension)
    on the tokens routed to them, and the partial outputs are summed across devices.
    """

    def __init__(self, config: Llama4Config, dtype, rngs: nnx.Rngs, mesh: Mesh | None = None,
                 quant: QuantConfig | None = None):
        D, F, E = config.hidden_size, config.intermediate_size, config.num_experts
        self.top_k = config.num_experts_per_tok
        self.mesh = mesh
        # The router is tiny and every device needs all of it to route.
        self.router = _param(rngs, (D, E), ("embed", None), dtype)
        routed = q.for_target(quant, "routed")
        ffn = q.ffn_axis(F, routed, mesh)
        self.gate = q.weight(rngs, (E, D, F), ("experts", "embed", ffn), dtype, routed)
        self.up = q.weight(rngs, (E, D, F), ("experts", "embed", ffn), dtype, routed)
        self.down = q.weight(rngs, (E, F, D), ("experts", ffn, "embed"), dtype, routed)
        self.shared = MLP(D, F, dtype, rngs, q.for_target(quant, "shared"), mesh)

    def __call__(self, x: jax.Array) -> jax.Array:
        weights = (self.router[...], self.gate[...], self.up[...], self.down[...])
        mesh = self.mesh
        if mesh is None or mesh.size == 1:
            routed = routed_experts(x, *weights, top_k=self.top_k, expert_axis=None,
                                    sum_axes=())
        else:
            x_spec = logical_spec(("tokens", "embed"), x.shape, mesh)
            gate_spec, up_spec, down_spec = (q.spec_of(w, mesh)
                                             for w in (self.gate, self.up, self.down))
            split = q.leading_spec(up_spec)
            fn = functools.partial(routed_experts, top_k=self.top_k, expert_axis=split[0],
                                   sum_axes=shard_axes(split), ffn_axis=split[2])
            # check_vma=False: the int4 experts' pallas_call (on a GPU) has an out_shape
            # without a varying-axes annotation.
            routed = jax.shard_map(
                fn, mesh=mesh,
                in_specs=(x_spec, PartitionSpec(), gate_spec, up_spec, down_spec),
                out_specs=x_spec, check_vma=False)(x, *weights)
        return routed + self.shared(x)


def routed_experts(
    x: jax.Array,
    router: jax.Array,
    gate: jax.Array | q.QArray,
    up: jax.Array | q.QArray,
    down: jax.Array | q.QArray,
    *,
    top_k: int,
    expert_axis: str | None,
    sum_axes: tuple[str, ...],
    ffn_axis: str | None = None,
) -> jax.Array:
    """Routed-expert output for ``x [T, D]`` from the local experts ``gate/up [E_l, D, F_l]``.

    Local expert e is global expert ``first + e``; tokens routed elsewhere are sorted past
    the last local group and contribute nothing here. Partial sums over sharded experts or
    ffn slices are added across ``sum_axes``. Quantized weights (``QArray``) run through
    ``quant.ragged_matmul``; an fp8 scheme quantizes each row after the score scaled it, and
    the down projection's rows over the whole ffn (split over mesh axis ``ffn_axis``).
    """
    num_tokens, local_experts = x.shape[0], q.leading_shape(gate)[0]
    logits = x @ router  # [T, E]
    top_logit, top_expert = jax.lax.top_k(logits, top_k)  # [T, k]
    score = jax.nn.sigmoid(top_logit.astype(jnp.float32)).astype(x.dtype)

    first = 0 if expert_axis is None else jax.lax.axis_index(expert_axis) * local_experts
    expert = top_expert.reshape(-1) - first
    is_local = (expert >= 0) & (expert < local_experts)
    expert = jnp.where(is_local, expert, local_experts)
    order = jnp.argsort(expert, stable=True)
    token = (jnp.arange(num_tokens * top_k) // top_k)[order]
    weight = jnp.where(is_local, score.reshape(-1), 0)[order]
    routed_in = x[token] * weight[:, None]
    group_sizes = jnp.bincount(expert, length=local_experts + 1)[:local_experts]
    group_sizes = group_sizes.astype(jnp.int32)

    row_expert = jnp.minimum(expert[order], local_experts - 1)  # picks each row's scales
    h = jax.nn.silu(q.ragged_matmul(routed_in, gate, group_sizes, row_expert))
    h = h * q.ragged_matmul(routed_in, up, group_sizes, row_expert)
    routed_out = q.ragged_matmul(h, down, group_sizes, row_expert, ffn_axis)
    routed_out = jnp.where(is_local[order][:, None], routed_out, 0)
    out = jnp.zeros_like(x).at[token].add(routed_out)
    return jax.lax.psum(out, sum_axes) if sum_axes else out


def embed_lookup(table: jax.Array, tokens: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Rows of the embedding ``table [V, D]`` for ``tokens [T]``; on a mesh that splits the
    vocabulary, each shard looks up its own slice (``vocab_parallel_lookup``)."""
    if mesh is None or mesh.size == 1:
        return table[tokens]
    table_spec = logical_spec(("vocab", "embed"), table.shape, mesh)
    token_spec = logical_spec(("tokens",), tokens.shape, mesh)
    out_spec = logical_spec(("tokens", "embed"), (*tokens.shape, table.shape[1]), mesh)
    lookup = functools.partial(vocab_parallel_lookup, vocab_axis=table_spec[0])
    return jax.shard_map(lookup, mesh=mesh, in_specs=(table_spec, token_spec),
                         out_specs=out_spec)(table, tokens)


def vocab_parallel_lookup(table: jax.Array, tokens: jax.Array, vocab_axis: str | None) -> jax.Array:
    """Embedding rows for ``tokens`` from this device's slice of the vocabulary ``table``.

    A shard looks up only ids in its own range ``[first, first + rows)`` and contributes zeros
    for the rest; the sum over the vocabulary axis assembles every row exactly once.
    """
    if vocab_axis is None:
        return table[tokens]
    rows = table.shape[0]
    local = tokens - jax.lax.axis_index(vocab_axis) * rows
    mine = (local >= 0) & (local < rows)
    found = jnp.where(mine[:, None], table[jnp.clip(local, 0, rows - 1)], 0)
    return jax.lax.psum(found, vocab_axis)


class DecoderLayer(nnx.Module):
    def __init__(self, config: Llama4Config, layer: int, dtype, rngs: nnx.Rngs,
                 mesh: Mesh | None = None, quant: QuantConfig | None = None,
                 kv_scale: tuple[float, float] = (1.0, 1.0)):
        D = config.hidden_size
        self.mesh = mesh
        self.input_norm = RMSNorm(D, config.rms_norm_eps, dtype)
        self.attn = Attention(config, layer, dtype, rngs, mesh, kv_scale)
        self.post_attn_norm = RMSNorm(D, config.rms_norm_eps, dtype)
        if config.is_moe(layer):
            self.ffn = MoE(config, dtype, rngs, mesh, quant)
        else:
            self.ffn = MLP(D, config.intermediate_size_mlp, dtype, rngs,
                           q.for_target(quant, "dense"), mesh)

    def __call__(self, x, cache, meta, attention_impl):
        attn_out, cache = self.attn(self.input_norm(x), cache, meta, attention_impl)
        x = constrain(x + attn_out, ("tokens", "embed"), self.mesh)
        x = x + self.ffn(self.post_attn_norm(x))
        return constrain(x, ("tokens", "embed"), self.mesh), cache


class Llama4(nnx.Module):
    """Llama 4 text model: embedding, decoder layers, final norm, lm_head (tied or not).

    On a mesh the vocabulary is padded to a multiple of its mesh axis; padded embedding rows
    are zero and padded logits are -inf, so they never win an argmax or get sampled.
    ``quant`` quantizes the feed-forward weights it covers (``jaxllm.model.quant``). A
    multimodal config adds the vision tower (``self.vision``, ``jaxllm.model.vision``), whose
    projected features enter ``__call__`` as ``images``. ``kv_scales`` are the per-layer
    (k_scale, v_scale) of an fp8 KV cache (``Attention``), all 1.0 by default.
    """

    def __init__(self, config: Llama4Config, *, dtype=jnp.bfloat16, rngs: nnx.Rngs,
                 mesh: Mesh | None = None, quant: QuantConfig | None = None,
                 kv_scales: tuple[tuple[float, float], ...] | None = None):
        V, D = padded_vocab_size(config.vocab_size, mesh), config.hidden_size
        self.config = config
        self.mesh = mesh
        self.embed = _param(rngs, (V, D), ("vocab", "embed"), dtype)
        if kv_scales is None:
            kv_scales = ((1.0, 1.0),) * config.num_layers
        if len(kv_scales) != config.num_layers:
            raise ValueError(f"{len(kv_scales)} KV cache scales for {config.num_layers} layers")
        self.layers = nnx.List([DecoderLayer(config, i, dtype, rngs, mesh, quant, kv_scales[i])
                                for i in range(config.num_layers)])
        self.norm = RMSNorm(D, config.rms_norm_eps, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (D, V), ("embed", "vocab"), dtype)
        if config.vision is not None:
            self.vision = VisionModel(config.vision, dtype, rngs, mesh)

    def __call__(
        self,
        tokens: jax.Array,
        cache: KVCache,
        meta: AttentionMetadata,
        *,
        attention_impl: str = "xla",
        groups: LayerGroups | None = None,
        images: ImageEmbeds | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Runs the flat batch ``tokens [T]`` at ``meta.positions``; returns (hidden [T, D], cache).

        ``images`` (optional) puts projected image features in place of the text embedding
        of the rows it names (the ``<|patch|>`` rows), as HF's ``masked_scatter`` does.

        ``groups`` says which slab of ``cache`` and which of ``meta``'s block tables each
        layer uses (default: one group, a slab per layer). The new keys/values are written
        into the cache before attention reads it, so a step's own tokens attend to each other
        through the same pages as to the prefix.
        """
        hidden, cache, _ = self.forward(tokens, cache, meta, attention_impl=attention_impl,
                                        groups=groups, images=images)
        return hidden, cache

    def forward(
        self,
        tokens: jax.Array,
        cache: KVCache,
        meta: AttentionMetadata,
        *,
        attention_impl: str = "xla",
        groups: LayerGroups | None = None,
        images: ImageEmbeds | None = None,
        aux_layers: tuple[int, ...] = (),
    ) -> tuple[jax.Array, KVCache, jax.Array]:
        """``__call__`` that also returns the residual stream entering each layer in
        ``aux_layers`` (id 0: the embeddings), concatenated in layer order as vLLM does
        ``[T, len(aux_layers) * D]``: the features an EAGLE-3 draft head reads
        (``jaxllm.model.eagle3``)."""
        bad = [i for i in aux_layers if not 0 <= i < self.config.num_layers]
        if bad:
            raise ValueError(f"aux_layers {bad} outside [0, {self.config.num_layers})")
        groups = groups or layer_groups(self.config, hybrid=False)
        x = merge_image_embeddings(self._embed(tokens), images)
        cache = list(cache)
        aux = []
        for i, layer in enumerate(self.layers):
            if i in aux_layers:
                aux.append(x)
            slab = groups.layer_slab[i]
            x, cache[slab] = layer(x, cache[slab], meta.for_group(groups.layer_group[i]),
                                   attention_impl)
        features = jnp.concatenate(aux, axis=-1) if aux else x[:, :0]
        return self.norm(x), cache, features

    def _embed(self, tokens: jax.Array) -> jax.Array:
        return embed_lookup(self.embed[...], tokens, self.mesh)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits ``[..., V_padded]`` (vocab-sharded on a mesh); padding is -inf."""
        head = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        logits = jnp.einsum("...D,DV->...V", hidden, head, preferred_element_type=jnp.float32)
        is_real = jnp.arange(logits.shape[-1]) < self.config.vocab_size
        logits = jnp.where(is_real, logits, -jnp.inf)
        return constrain(logits, (None,) * (logits.ndim - 1) + ("vocab",), self.mesh)
