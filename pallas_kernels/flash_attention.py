"""Flash attention for prefill: a Triton-style Pallas kernel beside its pure-jnp reference.

Glossary: B batch, T query tokens, S key tokens, H query heads, K kv heads (H % K == 0),
d head dim, C chunk size.

Query i of batch b sits at position ``q_offsets[b] + i`` (``q_offsets >= 0``); key j at
position j. Key j is visible to a query at position ``pos`` iff ``j < kv_lengths[b]``, and
``j <= pos`` when causal, and ``j // C == pos // C`` when ``chunk_size`` C is set (Llama 4
chunked local attention). A query that sees no key returns zeros. Query head h reads kv head
``h // (H // K)`` (GQA without repeating K/V in memory).

The kernel visits, for each block of queries, only the KV blocks between the first and the
last visible one; blocks that every query in the block sees in full run without masks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
MIN_DOT_SIZE = 16  # Triton's tl.dot needs every matrix dimension to be at least 16.


def triton_compiler_params(num_warps: int, num_stages: int):
    """Triton compiler params (``CompilerParams``; ``TritonCompilerParams`` on older jax).

    Without them a GPU ``pallas_call`` lowers to Mosaic GPU, which cannot run these kernels.
    """
    cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def check_block_size(name: str, value: int) -> None:
    """Block sizes become tensor dimensions: powers of two, at least the Triton dot minimum."""
    if value < MIN_DOT_SIZE or value & (value - 1):
        raise ValueError(f"{name}={value}: must be a power of two >= {MIN_DOT_SIZE}")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def padded_head_dim(head_dim: int) -> int:
    return max(MIN_DOT_SIZE, next_power_of_2(head_dim))


def dot(a: jax.Array, b: jax.Array, *, trans_b: bool = False) -> jax.Array:
    """``a @ b`` (``a @ b.T`` with trans_b) accumulated in float32; lowers to Triton's dot."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def chunk_start(pos: jax.Array, chunk_size: int) -> jax.Array:
    """First position of the chunk holding ``pos`` (``pos`` clamped at 0)."""
    pos = jnp.maximum(pos, 0)
    return pos - lax.rem(pos, jnp.int32(chunk_size))


def kv_block_ranges(
    k_lo: jax.Array, k_hi: jax.Array, full_lo: jax.Array, full_hi: jax.Array, block_k: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """KV block bounds ``first <= full_first <= full_end <= end`` for one query block.

    Keys ``[k_lo, k_hi]`` may be visible to some query of the block, keys
    ``[full_lo, full_hi]`` are visible to all of them. Blocks ``[first, end)`` hold every
    visible key; blocks ``[full_first, full_end)`` need no mask. Empty ranges come out as
    ``first == end``; all four are non-negative, so no negative division happens.
    """
    bk = jnp.int32(block_k)
    first = lax.div(jnp.maximum(k_lo, 0), bk)
    end = jnp.where(k_hi >= k_lo, lax.div(jnp.maximum(k_hi, 0), bk) + 1, first)
    full_first = jnp.clip(lax.div(jnp.maximum(full_lo, 0) + bk - 1, bk), first, end)
    full_end = jnp.clip(lax.div(jnp.maximum(full_hi + 1, 0), bk), full_first, end)
    return first, full_first, full_end, end


def online_softmax_step(carry, s, v, mask):
    """One flash-attention update with base-2 scores ``s``; masked entries count as -inf."""
    acc, m_prev, l_prev = carry
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    # A row that has seen no key yet keeps max -inf; subtract 0 instead to avoid inf - inf.
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m_prev - m_use)
    p = jnp.exp2(s - m_use[:, None])
    l_new = l_prev * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
    return acc, m_new, l_new


def _flash_kernel(
    qoff_ref, kvlen_ref, q_ref, k_ref, v_ref, o_ref,
    *, causal: bool, chunk_size: int | None, group: int, qk_scale: float,
    block_q: int, block_k: int,
):
    q_block, head, batch = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_q, head_dim = q_ref.shape[1], q_ref.shape[3]
    kv_head = lax.div(head, jnp.int32(group))
    q_off = qoff_ref[batch]
    kv_len = kvlen_ref[batch]

    q0 = q_block * block_q
    rows = q0 + jnp.arange(block_q, dtype=jnp.int32)
    row_ok = rows < num_q
    pos = q_off + rows
    q_mask = jnp.broadcast_to(row_ok[:, None], (block_q, head_dim))
    q = plgpu.load(q_ref.at[batch, pl.ds(q0, block_q), head, :], mask=q_mask, other=0)

    # Key bounds from the first and last real query of the block.
    lo_pos = q_off + q0
    hi_pos = q_off + jnp.minimum(q0 + block_q, num_q) - 1
    k_lo, k_hi = jnp.int32(0), kv_len - 1
    full_lo, full_hi = jnp.int32(0), kv_len - 1
    if causal:
        k_hi = jnp.minimum(k_hi, hi_pos)
        full_hi = jnp.minimum(full_hi, lo_pos)
    if chunk_size is not None:
        k_lo = chunk_start(lo_pos, chunk_size)
        k_hi = jnp.minimum(k_hi, chunk_start(hi_pos, chunk_size) + chunk_size - 1)
        full_lo = chunk_start(hi_pos, chunk_size)
        full_hi = jnp.minimum(full_hi, chunk_start(lo_pos, chunk_size) + chunk_size - 1)
    first, full_first, full_end, end = kv_block_ranges(k_lo, k_hi, full_lo, full_hi, block_k)

    def masked_body(kb, carry):
        keys = kb * block_k + jnp.arange(block_k, dtype=jnp.int32)
        key_ok = keys < kv_len
        kv_mask = jnp.broadcast_to(key_ok[:, None], (block_k, head_dim))
        window = (batch, pl.ds(kb * block_k, block_k), kv_head, slice(None))
        # other=0 on V as well: past kv_len (or past S, where interpret mode pads with NaN)
        # it may hold NaN, and 0 * NaN = NaN. Keys below kv_len are the caller's data.
        k = plgpu.load(k_ref.at[window], mask=kv_mask, other=0)
        v = plgpu.load(v_ref.at[window], mask=kv_mask, other=0)
        s = dot(q, k, trans_b=True) * qk_scale
        visible = row_ok[:, None] & key_ok[None, :]
        if causal:
            visible &= keys[None, :] <= pos[:, None]
        if chunk_size is not None:
            c = jnp.int32(chunk_size)
            same = lax.div(keys, c)[None, :] == lax.div(jnp.maximum(pos, 0), c)[:, None]
            visible &= same
        return online_softmax_step(carry, s, v, visible)

    def full_body(kb, carry):
        window = (batch, pl.ds(kb * block_k, block_k), kv_head, slice(None))
        k, v = plgpu.load(k_ref.at[window]), plgpu.load(v_ref.at[window])
        s = dot(q, k, trans_b=True) * qk_scale
        return online_softmax_step(carry, s, v, None)

    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    carry = lax.fori_loop(first, full_first, masked_body, carry)
    carry = lax.fori_loop(full_first, full_end, full_body, carry)
    acc, _, l_sum = lax.fori_loop(full_end, end, masked_body, carry)

    seen = l_sum > 0
    out = jnp.where(seen[:, None], acc / jnp.where(seen, l_sum, 1.0)[:, None], 0.0)
    plgpu.store(o_ref.at[batch, pl.ds(q0, block_q), head, :], out.astype(o_ref.dtype),
                mask=q_mask)


def _check_qkv(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B,T,H,d], k = v [B,S,K,d]; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    (batch, _, heads, head_dim), (kbatch, _, kv_heads, kdim) = q.shape, k.shape
    if kbatch != batch or kdim != head_dim:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} are not a multiple of kv heads {kv_heads}")


def _positions(q, k, q_offsets, kv_lengths) -> tuple[jax.Array, jax.Array]:
    batch, seq_k = q.shape[0], k.shape[1]
    q_off = jnp.zeros((batch,), jnp.int32) if q_offsets is None else q_offsets
    kv_len = jnp.full((batch,), seq_k, jnp.int32) if kv_lengths is None else kv_lengths
    q_off = jnp.broadcast_to(jnp.asarray(q_off, jnp.int32), (batch,))
    kv_len = jnp.clip(jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32), (batch,)), 0, seq_k)
    return q_off, kv_len


@functools.partial(
    jax.jit,
    static_argnames=("causal", "chunk_size", "sm_scale", "block_q", "block_k", "num_warps",
                     "num_stages", "interpret"),
)
def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    chunk_size: int | None = None,
    q_offsets: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    sm_scale: float | None = None,
    block_q: int = 128,
    block_k: int = 64,
    num_warps: int = 8,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:
    """Attention of q ``[B, T, H, d]`` over k, v ``[B, S, K, d]`` (see module docstring)."""
    _check_qkv(q, k, v)
    check_block_size("block_q", block_q)
    check_block_size("block_k", block_k)
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size}: must be positive")
    batch, num_q, heads, head_dim = q.shape
    group = heads // k.shape[2]
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    q_off, kv_len = _positions(q, k, q_offsets, kv_lengths)

    # Tensor sizes inside the kernel must be powers of two: zero-pad the head dim.
    dim = padded_head_dim(head_dim)
    if dim != head_dim:
        pad = ((0, 0), (0, 0), (0, 0), (0, dim - head_dim))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)

    kernel = functools.partial(
        _flash_kernel, causal=causal, chunk_size=chunk_size, group=group,
        qk_scale=scale * LOG2_E, block_q=block_q, block_k=block_k,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, num_q, heads, dim), q.dtype),
        grid=(pl.cdiv(num_q, block_q), heads, batch),
        compiler_params=triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="flash_attention",
    )(q_off, kv_len, q, k, v)
    return out[..., :head_dim]


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
    _check_qkv(q, k, v)
    batch, num_q, heads, head_dim = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    q_off, kv_len = _positions(q, k, q_offsets, kv_lengths)

    q_pos = q_off[:, None] + jnp.arange(num_q, dtype=jnp.int32)[None, :]  # [B, T]
    k_pos = jnp.arange(seq_k, dtype=jnp.int32)
    visible = visibility_mask(q_pos, k_pos[None, :], kv_len, causal=causal,
                              chunk_size=chunk_size)[:, None, None]  # [B, 1, 1, T, S]
    owned = (k_pos[None, :] < kv_len[:, None])[:, :, None, None]  # [B, S, 1, 1]
    kf = jnp.where(owned, k.astype(jnp.float32), 0.0)
    vf = jnp.where(owned, v.astype(jnp.float32), 0.0)
    qg = q.astype(jnp.float32).reshape(batch, num_q, kv_heads, heads // kv_heads, head_dim)

    scores = jnp.einsum("BTKgd,BSKd->BKgTS", qg, kf) * scale
    scores = jnp.where(visible, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.where(visible, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    out = jnp.einsum("BKgTS,BSKd->BTKgd", probs / jnp.where(denom > 0, denom, 1.0), vf)
    return out.reshape(batch, num_q, heads, head_dim).astype(q.dtype)
