"""Flash attention written from its definition, in plain jnp, and the checks its kernel shares.

Glossary: B batch, T query tokens, S key tokens, H query heads, K kv heads (H % K == 0),
d head dim, C chunk size.

Query i of batch b sits at position ``q_offsets[b] + i`` (``q_offsets >= 0``); key j at
position j. Key j is visible to a query at position ``pos`` iff ``j < kv_lengths[b]``, and
``j <= pos`` when causal, and ``j // C == pos // C`` when ``chunk_size`` C is set (Llama 4
chunked local attention). A query that sees no key returns zeros. Query head h reads kv head
``h // (H // K)`` (GQA without repeating K/V in memory).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The definition in float32: on a GPU the default precision would multiply in TF32.
HIGHEST = jax.lax.Precision.HIGHEST


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B,T,H,d], k = v [B,S,K,d]; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    (batch, _, heads, head_dim), (kbatch, _, kv_heads, kdim) = q.shape, k.shape
    if kbatch != batch or kdim != head_dim:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} are not a multiple of kv heads {kv_heads}")


def offsets_and_lengths(q: jax.Array, k: jax.Array, q_offsets: jax.Array | None,
                        kv_lengths: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    batch, seq_k = q.shape[0], k.shape[1]
    q_off = jnp.zeros((batch,), jnp.int32) if q_offsets is None else q_offsets
    kv_len = jnp.full((batch,), seq_k, jnp.int32) if kv_lengths is None else kv_lengths
    q_off = jnp.broadcast_to(jnp.asarray(q_off, jnp.int32), (batch,))
    kv_len = jnp.clip(jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32), (batch,)), 0, seq_k)
    return q_off, kv_len


def visibility_mask(
    q_pos: jax.Array, k_pos: jax.Array, kv_len: jax.Array, *, causal: bool,
    chunk_size: int | None,
) -> jax.Array:
    """``[..., T, S]`` boolean mask of the visibility rule, from absolute positions."""
    visible = k_pos[..., None, :] < kv_len[..., None, None]
    if causal:
        visible &= k_pos[..., None, :] <= q_pos[..., :, None]
    if chunk_size is not None:
        visible &= (k_pos[..., None, :] // chunk_size) == (q_pos[..., :, None] // chunk_size)
    return visible


def flash_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    chunk_size: int | None = None,
    q_offsets: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """The definition in plain jnp (float32 math), materializing all [T, S] scores."""
    check_qkv(q, k, v)
    batch, num_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    q_off, kv_len = offsets_and_lengths(q, k, q_offsets, kv_lengths)

    q_pos = q_off[:, None] + jnp.arange(num_q, dtype=jnp.int32)[None, :]  # [B, T]
    k_pos = jnp.arange(seq_k, dtype=jnp.int32)
    visible = visibility_mask(q_pos, k_pos[None, :], kv_len, causal=causal,
                              chunk_size=chunk_size)[:, None, None]  # [B, 1, 1, T, S]
    owned = (k_pos[None, :] < kv_len[:, None])[:, :, None, None]  # [B, S, 1, 1]
    kf = jnp.where(owned, k.astype(jnp.float32), 0.0)
    vf = jnp.where(owned, v.astype(jnp.float32), 0.0)
    qg = q.astype(jnp.float32).reshape(batch, num_q, kv_heads, heads // kv_heads, head_dim)

    scores = jnp.einsum("BTKgd,BSKd->BKgTS", qg, kf, precision=HIGHEST) * scale
    scores = jnp.where(visible, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.where(visible, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    out = jnp.einsum("BKgTS,BSKd->BTKgd", probs / jnp.where(denom > 0, denom, 1.0), vf,
                     precision=HIGHEST)
    return out.reshape(batch, num_q, heads, head_dim).astype(q.dtype)
