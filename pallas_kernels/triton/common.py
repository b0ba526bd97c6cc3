"""Helpers every Triton-style Pallas kernel here shares: compiler params, block-size rules,
the float32-accumulating dot, chunk bounds, KV block ranges and the online-softmax update."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
MIN_DOT_SIZE = 16  # Triton's tl.dot needs every matrix dimension to be at least 16.


def triton_compiler_params(num_warps: int, num_stages: int) -> Any:
    """Triton compiler params (``CompilerParams``; ``TritonCompilerParams`` on older jax).

    Without them a GPU ``pallas_call`` lowers to Mosaic GPU, which cannot run these kernels.
    """
    cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def targets_gpu() -> bool:
    """Whether the program being traced is for a GPU, so kernels lower for it rather than run
    in interpret mode: the current abstract mesh's device when one is set (a deviceless
    compile for a GPU runs on the CPU backend), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if device is not None:
        return device.platform == "gpu"
    return jax.default_backend() == "gpu"


def check_block_size(name: str, value: int) -> None:
    """Block sizes become tensor dimensions: powers of two, at least the Triton dot minimum."""
    if value < MIN_DOT_SIZE or value & (value - 1):
        raise ValueError(f"{name}={value}: must be a power of two >= {MIN_DOT_SIZE}")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def padded_head_dim(head_dim: int) -> int:
    return max(MIN_DOT_SIZE, next_power_of_2(head_dim))


def dot(a: jax.Array, b: jax.Array, *, trans_b: bool = False) -> jax.Array:
    """``a @ b`` (``a @ b.T`` with trans_b) accumulated in float32; lowers to Triton's dot.

    Float32 inputs multiply in float32 (``HIGHEST``): the default would lower to TF32.
    """
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision,
                           preferred_element_type=jnp.float32)


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


def online_softmax_step(carry: tuple[jax.Array, jax.Array, jax.Array], s: jax.Array,
                        v: jax.Array, mask: jax.Array | None
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
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
