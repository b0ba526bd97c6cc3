"""Grouped (ragged) GEMM over weight-only quantized experts: the Triton-style Pallas kernel of
``pallas_kernels.reference.grouped_matmul``.

Rows of ``x`` are sorted by expert; each program multiplies one tile of one expert's rows by
one block of that expert's columns, reading the int8 or packed int4 weight and widening it in
registers. No dequantized copy of a weight is ever written to memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.triton.common import (
    MIN_DOT_SIZE,
    check_block_size,
    dot,
    next_power_of_2,
    triton_compiler_params,
)

SCHEMES = ("int8", "int4")


def tile_metadata(group_sizes: jax.Array, num_rows: int, *, num_tiles: int,
                  block_m: int) -> jax.Array:
    """``[num_tiles, 4]`` int32: per row tile its expert, first row, number of rows (0 for an
    unused tile) and whether it is a zero tile. Group ``e`` holds rows ``[start_e, end_e)``
    (offsets from ``group_sizes``, clipped to ``num_rows``) and gets ``ceil(size / block_m)``
    tiles starting at ``start_e``; the rows past the last group get zero tiles (their output is
    0, as ``ragged_dot``'s). Tiles of neighbouring groups may overlap; each stores only its
    own rows."""
    num_experts = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), num_rows)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    # One more group: the rows no expert owns.
    starts = jnp.append(starts, ends[-1])
    ends = jnp.append(ends, jnp.int32(num_rows))
    tiles = (ends - starts + block_m - 1) // block_m
    tile_end = jnp.cumsum(tiles)
    t = jnp.arange(num_tiles, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(tile_end, t, side="right"), num_experts)
    row0 = starts[group] + (t - (tile_end[group] - tiles[group])) * block_m
    nrows = jnp.where(t < tile_end[-1], jnp.clip(ends[group] - row0, 0, block_m), 0)
    expert = jnp.minimum(group, num_experts - 1)
    zero = (group == num_experts).astype(jnp.int32)
    return jnp.stack([expert, row0, nrows, zero], axis=1).astype(jnp.int32)


def _kernel(meta_ref, x_ref, w_ref, s_ref, o_ref, *, scheme: str, block_m: int, block_n: int,
            block_k: int, group_size: int):
    """One (row tile, column block) program. int8: ``w_ref [E, D, F]``, ``s_ref [E, F]``, the
    block's ``block_n`` columns. int4: ``w_ref [E, D, F / 2]`` int8 bytes, each holding columns
    2j (low nibble) and 2j + 1 (high nibble), ``s_ref [E, G, F]``; the block's ``block_n``
    bytes are ``2 * block_n`` columns, kept as an even and an odd half until the store."""
    tile, nb = pl.program_id(0), pl.program_id(1)
    expert, row0, nrows, zero = (meta_ref[tile, i] for i in range(4))
    num_out_rows, dim = x_ref.shape
    wide = w_ref.shape[2]  # int8: F columns; int4: F / 2 bytes

    m = jnp.arange(block_m, dtype=jnp.int32)
    rows = row0 + m
    row_ok = (m < nrows) & (rows < num_out_rows)
    j = nb * block_n + jnp.arange(block_n, dtype=jnp.int32)
    j_ok = j < wide
    j_safe = jnp.minimum(j, wide - 1)
    kk = jnp.arange(block_k, dtype=jnp.int32)
    halves = (2 * j_safe, 2 * j_safe + 1) if scheme == "int4" else (j_safe,)
    steps = jnp.where((nrows > 0) & (zero == 0), jnp.int32(pl.cdiv(dim, block_k)),
                      jnp.int32(0))
    x_rows = jnp.clip(rows, 0, num_out_rows - 1)

    def body(kb, accs):
        k = kb * block_k + kk
        k_ok = k < dim
        x_mask = row_ok[:, None] & k_ok[None, :]
        x = plgpu.load(x_ref.at[x_rows[:, None], k[None, :]], mask=x_mask, other=0.0)
        w_mask = k_ok[:, None] & j_ok[None, :]
        w = plgpu.load(w_ref.at[expert, jnp.minimum(k, dim - 1)[:, None], j_safe[None, :]],
                       mask=w_mask, other=0)
        if scheme == "int8":
            return (accs[0] + dot(x, w.astype(x.dtype)),)
        # Sign-extended nibbles; the block's rows lie in one scale group (group_size is a
        # multiple of block_k), so its partial product is scaled as a whole.
        low = lax.shift_right_arithmetic(lax.shift_left(w, jnp.int8(4)), jnp.int8(4))
        high = lax.shift_right_arithmetic(w, jnp.int8(4))
        g = lax.div(kb * block_k, jnp.int32(group_size))
        out = []
        for acc, nibbles, cols in zip(accs, (low, high), halves, strict=True):
            scale = plgpu.load(s_ref.at[expert, g, cols], mask=j_ok, other=0.0)
            out.append(acc + dot(x, nibbles.astype(x.dtype)) * scale.astype(jnp.float32)[None, :])
        return tuple(out)

    accs = tuple(jnp.zeros((block_m, block_n), jnp.float32) for _ in halves)
    accs = lax.fori_loop(jnp.int32(0), steps, body, accs)
    if scheme == "int8":
        scale = plgpu.load(s_ref.at[expert, j_safe], mask=j_ok, other=0.0)
        accs = (accs[0] * scale.astype(jnp.float32)[None, :],)

    # Zero tiles (no K steps) store zeros. Masked-off elements go to the spare row
    # num_out_rows, so that none aliases a real element (interpret mode writes masked
    # elements back as they were).
    mask = row_ok[:, None] & j_ok[None, :]
    out_rows = jnp.where(mask, rows[:, None], num_out_rows)
    for acc, cols in zip(accs, halves, strict=True):
        out_cols = jnp.where(mask, cols[None, :], 0)
        plgpu.store(o_ref.at[out_rows, out_cols], acc.astype(o_ref.dtype), mask=mask)


def default_block_m(num_rows: int, num_experts: int) -> int:
    """Rows per tile: 16 (Triton's dot minimum) while the average group is that small (decode),
    up to 64 for prefill-sized groups."""
    return min(64, max(MIN_DOT_SIZE, next_power_of_2(num_rows // max(num_experts, 1))))


def packed_int4(q: jax.Array) -> jax.Array:
    """int4 ``q [..., F]`` as its bytes ``[..., F / 2]`` int8 (column 2j in the low nibble):
    XLA keeps int4 packed two per byte, so this is a bitcast, not a copy."""
    *lead, f = q.shape
    return lax.bitcast_convert_type(q.reshape(*lead, f // 2, 2), jnp.int8)


@functools.partial(
    jax.jit,
    static_argnames=("scheme", "group_size", "block_m", "block_n", "block_k", "num_warps",
                     "num_stages", "interpret"),
)
def grouped_matmul(
    x: jax.Array,
    q: jax.Array,
    scale: jax.Array,
    group_sizes: jax.Array,
    *,
    scheme: str,
    group_size: int = 128,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:
    """The Pallas (Triton) kernel of ``grouped_matmul_reference``; same semantics.

    ``x [R, D]`` (rows sorted by expert, ``group_sizes [E]`` each), ``q [E, D, F]`` int8 with
    ``scale [E, F]`` or int4 with ``scale [E, ceil(D / group_size), F]``; ``[R, F]`` in x's
    dtype, float32 accumulation, zero rows past the groups. The grid is (row tiles, column
    blocks); a tile never spans two experts (``tile_metadata``). int4 needs an even F and
    ``group_size`` a power of two >= 16 (the K block is ``min(block_k, group_size)``).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"grouped_matmul scheme {scheme!r}: expected one of {SCHEMES}")
    num_rows, dim = x.shape
    num_experts, qdim, num_cols = q.shape
    want = (num_experts, num_cols) if scheme == "int8" else \
        (num_experts, -(-dim // group_size), num_cols)
    if qdim != dim or scale.shape != want or group_sizes.shape != (num_experts,):
        raise ValueError(f"x {x.shape}, q {q.shape}, scale {scale.shape}, group_sizes "
                         f"{group_sizes.shape}: expected x [R, D], q [E, D, F], scale {want}, "
                         "group_sizes [E]")
    if scheme == "int4":
        if num_cols % 2:
            raise ValueError(f"int4 grouped_matmul: F={num_cols} must be even (two columns "
                             "a byte)")
        check_block_size("int4 group_size", group_size)
        block_k = min(block_k, group_size)
        weights = packed_int4(q)
    else:
        weights = q
    check_block_size("block_k", block_k)
    block_m = default_block_m(num_rows, num_experts) if block_m is None else block_m
    check_block_size("block_m", block_m)
    wide = weights.shape[2]
    if block_n is None:  # int4: 64 bytes = 128 columns per program
        block_n = min(128 if scheme == "int8" else 64, max(MIN_DOT_SIZE, next_power_of_2(wide)))
    check_block_size("block_n", block_n)
    num_tiles = pl.cdiv(num_rows, block_m) + num_experts + 1
    meta = tile_metadata(group_sizes, num_rows, num_tiles=num_tiles, block_m=block_m)
    kernel = functools.partial(_kernel, scheme=scheme, block_m=block_m, block_n=block_n,
                               block_k=block_k, group_size=group_size)
    # One spare output row (index R) takes the masked-off stores.
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_rows + 1, num_cols), x.dtype),
        grid=(num_tiles, pl.cdiv(wide, block_n)),
        compiler_params=triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="grouped_matmul",
    )(meta, x, weights, scale)
    return out[:num_rows]
