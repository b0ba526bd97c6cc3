"""Grouped (ragged) GEMM over weight-only quantized experts, from its definition: dequantize
each expert's weight, then multiply its rows by it."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul_reference(x: jax.Array, q: jax.Array, scale: jax.Array,
                             group_sizes: jax.Array, *, scheme: str,
                             group_size: int = 128) -> jax.Array:
    """``out[r] = x[r] @ (q[e] * scale[e])`` for the rows ``r`` of group ``e`` (rows sorted by
    expert, ``group_sizes [E]`` each; rows past the groups are 0), in float32, returned in
    x's dtype. int8: ``scale [E, F]`` per out column; int4: ``scale [E, G, F]`` per
    ``group_size`` in features and out column."""
    num_rows, dim = x.shape
    if scheme == "int4":
        rows = jnp.repeat(scale.astype(jnp.float32), group_size, axis=1)[:, :dim]
    else:
        rows = scale.astype(jnp.float32)[:, None, :]
    w = q.astype(jnp.float32) * rows  # [E, D, F]
    ends = jnp.cumsum(group_sizes)
    row_expert = jnp.searchsorted(ends, jnp.arange(num_rows), side="right")
    owned = row_expert < q.shape[0]
    w_rows = w[jnp.minimum(row_expert, q.shape[0] - 1)]  # [R, D, F]
    out = jnp.einsum("rd,rdf->rf", x.astype(jnp.float32), w_rows,
                     precision=jax.lax.Precision.HIGHEST)
    return jnp.where(owned[:, None], out, 0.0).astype(x.dtype)
