"""grouped_matmul (interpret mode) and grouped_matmul_reference against a numpy definition:
dequantize each expert's weight (q times its column or group scales), then multiply the rows
of its group by it; rows past the groups are zero."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import grouped_matmul, grouped_matmul_reference
from pallas_kernels.triton.grouped_matmul import packed_int4, tile_metadata
from tests.pallas_kernels.triton.test_flash_attention import lower_for_cuda

pytestmark = pytest.mark.heavy  # kernels in interpret mode: seconds each (tests/conftest.py)


def numpy_definition(x, q, scale, sizes, scheme, group_size):
    x, q, scale = (np.asarray(a, np.float64) for a in (x, q, scale))
    out = np.zeros((x.shape[0], q.shape[2]))
    start = 0
    for e, n in enumerate(sizes):
        if scheme == "int4":
            s = np.repeat(scale[e], group_size, axis=0)[: q.shape[1]]
        else:
            s = scale[e][None, :]
        out[start:start + n] = x[start:start + n] @ (q[e] * s)
        start += n
    return out


def make_case(sizes, rows, dim, cols, scheme, group_size=128, seed=0, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    experts = len(sizes)
    lo, hi = (-8, 8) if scheme == "int4" else (-127, 128)
    q_np = rng.integers(lo, hi, size=(experts, dim, cols))
    q = jnp.asarray(q_np, jnp.int4 if scheme == "int4" else jnp.int8)
    groups = -(-dim // group_size)
    shape = (experts, groups, cols) if scheme == "int4" else (experts, cols)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, shape) / 64, dtype)
    x = jnp.asarray(rng.normal(size=(rows, dim)), dtype)
    return x, q, scale, jnp.asarray(sizes, jnp.int32)


# (group sizes, rows, D, F, group_size): empty groups first, last and in the middle, groups
# that straddle row tiles, rows past every group, D not a multiple of the K block, F not a
# multiple of the column block, short int4 groups.
CASES = {
    "decode_like": ([3, 0, 5, 1], 12, 128, 64, 128),
    "empty_ends": ([0, 20, 0, 17, 0], 40, 96, 96, 32),
    "one_group": ([33], 33, 64, 32, 64),
    "all_empty": ([0, 0], 8, 32, 32, 32),
    "straddle_tiles": ([17, 1, 30], 64, 160, 130, 32),
}


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_and_reference_match_definition(case, scheme):
    sizes, rows, dim, cols, group_size = CASES[case]
    x, q, scale, group_sizes = make_case(sizes, rows, dim, cols, scheme, group_size)
    want = numpy_definition(x, q, scale, sizes, scheme, group_size)
    got = grouped_matmul(x, q, scale, group_sizes, scheme=scheme, group_size=group_size,
                         block_m=16, interpret=True)
    ref = grouped_matmul_reference(x, q, scale, group_sizes, scheme=scheme,
                                   group_size=group_size)
    assert got.shape == (rows, cols) and got.dtype == x.dtype
    # bf16 output: one rounding of a value of order |want|.
    tol = 1e-2 * (np.abs(want).max() + 1)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(ref, np.float64), want, atol=tol, rtol=1e-2)
    past = sum(sizes)
    assert not np.asarray(got[past:], np.float64).any()


def test_float32_exact_order():
    """In float32 the kernel's only difference from the definition is summation order."""
    sizes, rows, dim, cols, group_size = CASES["straddle_tiles"]
    x, q, scale, group_sizes = make_case(sizes, rows, dim, cols, "int4", group_size, seed=3,
                                         dtype=jnp.float32)
    want = numpy_definition(x, q, scale, sizes, "int4", group_size)
    got = grouped_matmul(x, q, scale, group_sizes, scheme="int4", group_size=group_size,
                         block_m=16, block_n=16, block_k=16, interpret=True)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-4, rtol=1e-5)


def test_packed_int4_is_low_nibble_first():
    q = jnp.asarray([[1, -2, 7, -8]], jnp.int4)
    packed = np.asarray(packed_int4(q)).view(np.uint8)
    assert packed.tolist() == [[0xE1, 0x87]]
    assert np.asarray(q).dtype == ml_dtypes.int4


def test_tile_metadata_covers_each_row_once():
    """Every row of every group is in exactly one tile of its expert; rows past the groups
    in zero tiles; the static tile count is enough for the worst case."""
    rng = np.random.default_rng(1)
    for _ in range(15):
        experts, block = int(rng.integers(1, 6)), 16
        sizes = rng.integers(0, 40, experts) * rng.integers(0, 2, experts)
        rows = int(sizes.sum() + rng.integers(0, 20)) or 1
        tiles = -(-rows // block) + experts + 1
        meta = np.asarray(tile_metadata(jnp.asarray(sizes, jnp.int32), rows,
                                        num_tiles=tiles, block_m=block))
        owner = np.concatenate([np.repeat(np.arange(experts), sizes),
                                np.full(rows - sizes.sum(), -1)])
        seen = np.zeros(rows, int)
        for expert, row0, nrows, zero in meta:
            for r in range(row0, row0 + nrows):
                seen[r] += 1
                assert owner[r] == (-1 if zero else expert)
        assert (seen == 1).all(), (sizes, rows, meta)


def test_rejects_bad_shapes():
    x, q, scale, sizes = make_case([2, 2], 4, 64, 32, "int4", 32)
    with pytest.raises(ValueError, match="scale"):
        grouped_matmul(x, q, scale[:, :1], sizes, scheme="int4", group_size=32, interpret=True)
    with pytest.raises(ValueError, match="group_size"):
        grouped_matmul(x, q, jnp.ones((2, 3, 32), x.dtype), sizes, scheme="int4",
                       group_size=24, interpret=True)
    with pytest.raises(ValueError, match="scheme"):
        grouped_matmul(x, q, scale, sizes, scheme="fp8", interpret=True)


def test_lowers_to_triton_for_cuda(monkeypatch):
    """The real Triton lowering rules accept the kernel (nibble shifts, strided scale loads
    and stores, int8 -> bf16 widening) at a Scout decode shape per device."""
    x, q, scale, sizes = make_case([4] * 16, 64, 512, 256, "int4")
    ttir, _ = lower_for_cuda(monkeypatch, lambda *a: grouped_matmul(*a, scheme="int4"),
                             x, q, scale, sizes)
    assert "tt.dot" in ttir and "arith.shrsi" in ttir
    assert "tensor<128x64xi8>" in ttir  # the packed weight block, never a bf16 weight in HBM
