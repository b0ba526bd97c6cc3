"""Llama 4's vision tower, pixel-shuffle adapter and projector in Flax NNX (HF transformers'
``Llama4VisionModel`` + ``Llama4MultiModalProjector``), and the merge of its features into
the text embedding.

One tile of ``image_size``² pixels becomes N = (image_size / patch_size)² patch tokens, a
class token appended at the end, a pre-norm transformer with a 2-D RoPE, then (class token
dropped) a pixel shuffle to N·r² tokens, a two-layer GELU MLP and a linear map into the text
model's width: the features that replace the text embedding at ``<|patch|>`` rows.

Glossary: N tiles, L patches per tile (T = L + 1 with the class token), P patch values
(channels · patch²), D vision width, H heads, d head dim, F encoder MLP width, R shuffled
width (D / r²), A adapter width, E text model width, M image-feature rows, T_s step rows.

Logical axes (``jaxllm.sharding``): ``tiles`` (the batch of tiles), ``vision_embed``,
``vision_heads``, ``vision_head_dim``, ``vision_ffn``, ``vision_patch``; the projector's output
is the text model's ``embed``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm.config import VisionConfig
from jaxllm.sharding import constrain


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype,
           scale: float = 0.02) -> nnx.Param:
    value = scale * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=axes)


def _zeros(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias, computed in float32."""

    def __init__(self, dim: int, eps: float, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("vision_embed",))
        self.bias = _zeros((dim,), ("vision_embed",), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        out = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (out * self.weight[...] + self.bias[...]).astype(x.dtype)


def rope_angles(config: VisionConfig) -> np.ndarray:
    """The 2-D RoPE angles ``[T, d/2]`` of one tile's tokens (the class token last, angle 0).

    Patch t sits at column x = t % side and row y = t // side; the first d/4 rotation pairs
    turn by (x + 1)·f_j, the last d/4 by (y + 1)·f_j, f_j = theta^(-2j / (d/2)).
    """
    side, quarter = config.patches_per_side, config.head_dim // 4
    freqs = config.rope_theta ** (-np.arange(0, 2 * quarter, 2, dtype=np.float64)
                                  / (2 * quarter))
    t = np.arange(config.num_patches)
    x, y = t % side + 1, t // side + 1
    angles = np.concatenate([x[:, None] * freqs, y[:, None] * freqs], axis=1)
    return np.concatenate([angles, np.zeros((1, 2 * quarter))]).astype(np.float32)


def rotate_pairs(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotates interleaved pairs of ``x [N, T, H, d]`` by ``angles [T, d/2]``."""
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


class VisionAttention(nnx.Module):
    """Bidirectional multi-head attention over one tile's tokens, biased q/k/v/o."""

    def __init__(self, config: VisionConfig, dtype, rngs: nnx.Rngs):
        D, H, d = config.hidden_size, config.num_heads, config.head_dim
        proj = ("vision_embed", "vision_heads", "vision_head_dim")
        self.wq, self.wk, self.wv = (_param(rngs, (D, H, d), proj, dtype) for _ in range(3))
        self.bq, self.bk, self.bv = (_zeros((H, d), proj[1:], dtype) for _ in range(3))
        self.wo = _param(rngs, (H, d, D), ("vision_heads", "vision_head_dim", "vision_embed"),
                         dtype)
        self.bo = _zeros((D,), ("vision_embed",), dtype)

    def __call__(self, x: jax.Array, angles: jax.Array) -> jax.Array:
        q = jnp.einsum("NTD,DHd->NTHd", x, self.wq[...]) + self.bq[...]
        k = jnp.einsum("NTD,DHd->NTHd", x, self.wk[...]) + self.bk[...]
        v = jnp.einsum("NTD,DHd->NTHd", x, self.wv[...]) + self.bv[...]
        q, k = rotate_pairs(q, angles), rotate_pairs(k, angles)
        scores = jnp.einsum("NTHd,NSHd->NHTS", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores * q.shape[-1] ** -0.5, axis=-1).astype(v.dtype)
        out = jnp.einsum("NHTS,NSHd->NTHd", probs, v)
        return jnp.einsum("NTHd,HdD->NTD", out, self.wo[...]) + self.bo[...]


class VisionLayer(nnx.Module):
    """Pre-norm encoder layer: LayerNorm -> attention -> LayerNorm -> GELU MLP, residuals."""

    def __init__(self, config: VisionConfig, dtype, rngs: nnx.Rngs, mesh: Mesh | None):
        D, F, eps = config.hidden_size, config.intermediate_size, config.layer_norm_eps
        self.mesh = mesh
        self.input_norm = LayerNorm(D, eps, dtype)
        self.attn = VisionAttention(config, dtype, rngs)
        self.post_attn_norm = LayerNorm(D, eps, dtype)
        self.fc1 = _param(rngs, (D, F), ("vision_embed", "vision_ffn"), dtype)
        self.fc1_bias = _zeros((F,), ("vision_ffn",), dtype)
        self.fc2 = _param(rngs, (F, D), ("vision_ffn", "vision_embed"), dtype)
        self.fc2_bias = _zeros((D,), ("vision_embed",), dtype)

    def __call__(self, x: jax.Array, angles: jax.Array) -> jax.Array:
        x = x + self.attn(self.input_norm(x), angles)
        x = constrain(x, ("tiles", None, "vision_embed"), self.mesh)
        h = gelu(self.post_attn_norm(x) @ self.fc1[...] + self.fc1_bias[...])
        x = x + h @ self.fc2[...] + self.fc2_bias[...]
        return constrain(x, ("tiles", None, "vision_embed"), self.mesh)


def gelu(x: jax.Array) -> jax.Array:
    """The exact (erf) GELU of ``torch.nn.GELU()``."""
    return jax.nn.gelu(x, approximate=False)


def pixel_shuffle(x: jax.Array, ratio: float) -> jax.Array:
    """``[N, L, D]`` patch features (L = side²) -> ``[N, L·r², D/r²]``, as HF's
    ``pixel_shuffle``: fold r⁻¹ neighbouring columns into the channels, transpose, fold r⁻¹
    neighbouring rows, transpose back."""
    n, length, dim = x.shape
    side = round(length ** 0.5)
    inv = round(1 / ratio)
    x = x.reshape(n, side, side // inv, dim * inv).transpose(0, 2, 1, 3)
    x = x.reshape(n, side // inv, side // inv, dim * inv * inv).transpose(0, 2, 1, 3)
    return x.reshape(n, -1, dim * inv * inv)


class VisionModel(nnx.Module):
    """Tiles ``[N, C, S, S]`` -> projected image features ``[N, tokens_per_tile, E]``."""

    def __init__(self, config: VisionConfig, dtype, rngs: nnx.Rngs, mesh: Mesh | None = None):
        c = config
        D, P = c.hidden_size, c.num_channels * c.patch_size ** 2
        A, E = c.projector_output_dim, c.text_hidden_size
        self.config = config
        self.mesh = mesh
        self.patch_embed = _param(rngs, (P, D), ("vision_patch", "vision_embed"), dtype)
        self.class_embedding = _param(rngs, (D,), ("vision_embed",), dtype)
        self.positional_embedding = _param(rngs, (c.num_patches + 1, D),
                                           (None, "vision_embed"), dtype)
        self.norm_pre = LayerNorm(D, c.layer_norm_eps, dtype)
        self.layers = nnx.List([VisionLayer(c, dtype, rngs, mesh) for _ in range(c.num_layers)])
        self.norm_post = LayerNorm(D, c.layer_norm_eps, dtype)
        self.adapter_fc1 = _param(rngs, (c.shuffled_dim, c.projector_input_dim),
                                  (None, "vision_ffn"), dtype)
        self.adapter_fc2 = _param(rngs, (c.projector_input_dim, A), ("vision_ffn", None), dtype)
        self.projector = _param(rngs, (c.vision_output_dim, E), ("vision_ffn", "embed"), dtype)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        x = jnp.einsum("NLP,PD->NLD", patchify(pixels.astype(self.patch_embed.dtype),
                                               c.patch_size), self.patch_embed[...])
        cls = jnp.broadcast_to(self.class_embedding[...], (x.shape[0], 1, x.shape[2]))
        x = jnp.concatenate([x, cls], axis=1) + self.positional_embedding[...]
        x = constrain(self.norm_pre(x), ("tiles", None, "vision_embed"), self.mesh)
        angles = jnp.asarray(rope_angles(c))
        for layer in self.layers:
            x = layer(x, angles)
        x = pixel_shuffle(self.norm_post(x)[:, :-1], c.pixel_shuffle_ratio)
        x = gelu(gelu(x @ self.adapter_fc1[...]) @ self.adapter_fc2[...])
        out = jnp.einsum("NLA,AE->NLE", x, self.projector[...])
        return constrain(out, ("tiles", None, "embed"), self.mesh)


def patchify(pixels: jax.Array, patch: int) -> jax.Array:
    """``[N, C, S, S]`` -> ``[N, L, C·patch²]``: patches row-major, each channel-major then
    row-major inside (``torch.nn.Unfold``'s order)."""
    n, ch, height, width = pixels.shape
    x = pixels.reshape(n, ch, height // patch, patch, width // patch, patch)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(n, -1, ch * patch * patch)


class ImageEmbeds(NamedTuple):
    """Image features for a flat batch of token rows: an optional input of the one step.

    features [M, E]: projected image features (``VisionModel`` output rows, any order).
    rows [T_s]: for each token row, the feature row that replaces its text embedding, or -1
        for a text row. Built on the host (``jaxllm.multimodal.prompt.feature_rows``), which
        checks every index against M.
    """

    features: jax.Array
    rows: jax.Array


def merge_image_embeddings(embeds: jax.Array, images: ImageEmbeds | None) -> jax.Array:
    """``embeds [T_s, E]`` with the rows that ``images.rows`` names replaced by features."""
    if images is None:
        return embeds
    rows = images.rows
    picked = images.features[jnp.clip(rows, 0, images.features.shape[0] - 1)]
    return jnp.where((rows >= 0)[:, None], picked.astype(embeds.dtype), embeds)
