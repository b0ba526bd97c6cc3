"""Flash attention for prefill: the Triton-style Pallas kernel of
``pallas_kernels.reference.flash_attention`` (same signature, same semantics).

The kernel visits, for each block of queries, only the KV blocks between the first and the
last visible one; blocks that every query in the block sees in full run without masks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.reference.flash_attention import check_qkv, offsets_and_lengths
from pallas_kernels.triton.common import (
    LOG2_E,
    check_block_size,
    chunk_start,
    dot,
    kv_block_ranges,
    online_softmax_step,
    padded_head_dim,
    triton_compiler_params,
)


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
    check_qkv(q, k, v)
    check_block_size("block_q", block_q)
    check_block_size("block_k", block_k)
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size}: must be positive")
    batch, num_q, heads, head_dim = q.shape
    group = heads // k.shape[2]
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    q_off, kv_len = offsets_and_lengths(q, k, q_offsets, kv_lengths)

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
