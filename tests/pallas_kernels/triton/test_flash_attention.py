"""flash_attention (interpret mode) against flash_attention_reference, and the reference
against a naive numpy attention written here from the definition."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import flash_attention, flash_attention_reference
from pallas_kernels.triton.common import kv_block_ranges

pytestmark = pytest.mark.heavy  # kernels in interpret mode: seconds each (tests/conftest.py)

BLOCK = 16  # block_q = block_k in the interpret tests (the Triton dot minimum)


def naive_attention(q, k, v, *, causal, chunk_size, q_offsets, kv_lengths, scale):
    """Per (batch, head, query) softmax over the visible keys, in float64 numpy."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, num_q, heads, _ = q.shape
    seq_k, kv_heads = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            kvh = h // (heads // kv_heads)
            for i in range(num_q):
                pos = q_offsets[b] + i
                keys = [
                    j for j in range(min(seq_k, kv_lengths[b]))
                    if (not causal or j <= pos)
                    and (chunk_size is None or j // chunk_size == pos // chunk_size)
                ]
                if not keys:
                    continue
                s = k[b, keys, kvh] @ q[b, i, h] * scale
                w = np.exp(s - s.max())
                out[b, i, h] = w @ v[b, keys, kvh] / w.sum()
    return out


def make_inputs(batch, num_q, seq_k, heads, kv_heads, head_dim, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, num_q, heads, head_dim))
    k = rng.standard_normal((batch, seq_k, kv_heads, head_dim))
    v = rng.standard_normal((batch, seq_k, kv_heads, head_dim))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


# (batch, T, S, H, K, d, causal, chunk, q_offsets, kv_lengths)
CASES = {
    "len1": (1, 1, 1, 2, 1, 16, True, None, None, None),
    "block-1": (1, BLOCK - 1, BLOCK - 1, 2, 2, 16, True, None, None, None),
    "block": (2, BLOCK, BLOCK, 2, 1, 16, True, None, None, None),
    "block+1_gqa8": (1, BLOCK + 1, BLOCK + 1, 8, 1, 16, True, None, None, None),
    "ragged_gqa2_dim24": (2, 37, 45, 4, 2, 24, True, None, [8, 0], [45, 30]),
    "noncausal_kvlen": (2, 21, 50, 4, 4, 16, False, None, None, [50, 3]),
    "chunk_C-1": (1, 31, 31, 2, 1, 16, True, 32, None, None),
    "chunk_C": (1, 32, 32, 2, 1, 16, True, 32, None, None),
    "chunk_C+1": (1, 33, 33, 2, 1, 16, True, 32, None, None),
    "chunk_2C+1_gqa2": (2, 65, 65, 4, 2, 16, True, 32, None, None),
    # A prefill over a cached prefix that straddles two chunk boundaries.
    "chunk_straddle_prefix": (2, 50, 90, 2, 1, 16, True, 32, [25, 40], [75, 90]),
    "chunk_noncausal": (1, 40, 70, 2, 2, 16, False, 32, [10], None),
    "sees_nothing": (2, 5, 20, 2, 1, 16, True, None, [0, 3], [0, 20]),
}


def run_case(case, dtype=jnp.float32, interpret=True, block=BLOCK, seed=0):
    batch, num_q, seq_k, heads, kv_heads, head_dim, causal, chunk, q_off, kv_len = case
    q, k, v = make_inputs(batch, num_q, seq_k, heads, kv_heads, head_dim, dtype, seed)
    kwargs = dict(
        causal=causal,
        chunk_size=chunk,
        q_offsets=None if q_off is None else jnp.asarray(q_off, jnp.int32),
        kv_lengths=None if kv_len is None else jnp.asarray(kv_len, jnp.int32),
    )
    out = flash_attention(q, k, v, block_q=block, block_k=block, interpret=interpret, **kwargs)
    ref = flash_attention_reference(q, k, v, **kwargs)
    return out, ref


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference_f32(case):
    out, ref = run_case(CASES[case])
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_query_that_sees_no_key_returns_zeros():
    out, _ = run_case(CASES["sees_nothing"])
    assert not np.any(np.asarray(out[0]))  # kv_lengths[0] == 0


def test_kernel_bf16():
    """bf16 in and out: the kernel feeds bf16 probabilities to the PV dot and rounds the
    output once, so with |v| ~ 1 the error stays within a few bf16 ulps (2**-8 relative)."""
    out, ref = run_case(CASES["chunk_straddle_prefix"], dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "causal, chunk, q_offset, poisoned",
    [
        (True, None, 0, slice(BLOCK, None)),  # keys after the block's last query
        (True, 32, 40, slice(0, 32)),  # the previous chunk
        (False, 32, 40, slice(0, 32)),  # the previous chunk, without the causal rule
    ],
)
def test_invisible_kv_blocks_are_skipped(causal, chunk, q_offset, poisoned):
    """One query block over 64 keys; NaN in K and V of whole blocks no query can see.

    Keys below kv_length are the caller's data, so the kernel zeroes V only past it: a block
    that was read rather than skipped would turn 0 * NaN into NaN in the output.
    """
    q, k, v = make_inputs(1, BLOCK, 64, 2, 1, 16)
    kwargs = dict(causal=causal, chunk_size=chunk, q_offsets=jnp.array([q_offset], jnp.int32))
    ref = flash_attention_reference(q, k, v, **kwargs)
    k, v = k.at[:, poisoned].set(jnp.nan), v.at[:, poisoned].set(jnp.nan)
    out = flash_attention(q, k, v, block_q=BLOCK, block_k=BLOCK, interpret=True, **kwargs)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_kv_block_ranges():
    # Keys 40..100 may be visible, 64..70 visible to all: blocks 2..6, unmasked block 4 only.
    got = [int(x) for x in kv_block_ranges(jnp.int32(40), jnp.int32(100), jnp.int32(64),
                                           jnp.int32(70), 16)]
    assert got == [2, 4, 4, 7]
    got = [int(x) for x in kv_block_ranges(jnp.int32(40), jnp.int32(100), jnp.int32(32),
                                           jnp.int32(127), 16)]
    assert got == [2, 2, 7, 7]  # clipped to the visible blocks
    got = [int(x) for x in kv_block_ranges(jnp.int32(8), jnp.int32(-1), jnp.int32(0),
                                           jnp.int32(-1), 16)]
    assert got[0] == got[3]  # nothing visible: an empty loop


def test_above_10k_tokens_chunk_8192():
    """A 10,300-token prefill with Llama 4's chunk size, checked on rows around the chunk
    boundary and at the end against the numpy definition."""
    num_q = 10_300
    q, k, v = make_inputs(1, num_q, num_q, 2, 1, 16)
    out = flash_attention(q, k, v, chunk_size=8192, block_q=128, block_k=128, interpret=True)
    rows = [0, 1, 8190, 8191, 8192, 8193, 10_000, num_q - 1]
    want = np.stack([
        # Row i sees exactly keys chunk_start(i)..i: hand those to a plain softmax.
        naive_attention(q[:, i:i + 1], k[:, i // 8192 * 8192:i + 1], v[:, i // 8192 * 8192:i + 1],
                        causal=False, chunk_size=None, q_offsets=[0], kv_lengths=[num_q],
                        scale=0.25)[:, 0]
        for i in rows
    ], axis=1)
    np.testing.assert_allclose(np.asarray(out[:, rows]), want, atol=1e-5, rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(out)))


def test_rejects_bad_blocks_and_heads():
    q, k, v = make_inputs(1, 4, 4, 3, 2, 16)
    with pytest.raises(ValueError, match="not a multiple"):
        flash_attention(q, k, v, interpret=True)
    q, k, v = make_inputs(1, 4, 4, 2, 1, 16)
    with pytest.raises(ValueError, match="block_q=24"):
        flash_attention(q, k, v, block_q=24, interpret=True)


def test_compiler_params_reach_pallas_call(compiler_params_seen):
    """Interpret mode ignores compiler params, so check the pallas_call arguments directly."""
    q, k, v = make_inputs(1, 3, 3, 2, 1, 16)
    flash_attention(q, k, v, block_q=16, block_k=16, num_warps=2, num_stages=5, interpret=True)
    [params] = compiler_params_seen
    assert isinstance(params, plgpu.CompilerParams)
    assert (params.num_warps, params.num_stages) == (2, 5)


def lower_for_cuda(monkeypatch, fn, *args) -> tuple[str, str]:
    """Lowers ``fn`` for CUDA on this CPU-only machine, which runs the real Triton lowering
    rules (power-of-2 tensors, dot shapes, masked loads). Returns (the Triton IR of the one
    kernel, the HLO text). Newer jaxlibs also compile the kernel while lowering, which needs
    a CUDA build: then the test stops after checking the Triton IR came out."""
    try:
        from jax._src.pallas.triton import pallas_call_registration as registration
    except ImportError:
        pytest.skip("this jax has no Triton lowering module")
    modules = []
    real = registration.lowering.lower_jaxpr_to_triton_module

    def spy(*a, **kw):
        result = real(*a, **kw)
        modules.append(result.module.operation.get_asm())
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", spy)
    # Since jax 0.11 the Triton lowering asks the current device for the GPU model; on a CPU
    # an abstract H100 stands in for it.
    h100 = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        "NVIDIA H100 80GB HBM3", 132, "gpu"))
    try:
        with jax.sharding.use_abstract_mesh(h100):
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except Exception as err:
        if len(modules) != 1:
            raise
        check_triton_ir(modules[0])
        pytest.skip(f"Triton IR checked; compiling it needs a CUDA jaxlib: {err}")
    assert len(modules) == 1
    return modules[0], text


def check_triton_ir(ttir: str) -> None:
    # Three KV loops (masked head, unmasked body, masked tail) with dynamic bounds.
    assert ttir.count("scf.for") == 3
    assert "tt.dot" in ttir


def test_lowers_to_triton_for_cuda(monkeypatch):
    q, k, v = make_inputs(2, 300, 300, 8, 2, 128, jnp.bfloat16)
    ttir, text = lower_for_cuda(
        monkeypatch,
        lambda q, k, v: flash_attention(q, k, v, chunk_size=128, num_warps=4, num_stages=2),
        q, k, v)
    check_triton_ir(ttir)
    assert "tensor<128x128xbf16> * tensor<128x64xbf16>" in ttir  # q block x k block^T
    if "__gpu$xla.gpu.triton" in text:  # jaxlib 0.10 keeps the launch config readable
        assert re.search(r"num_stages = 2 : i32, num_warps = 4 : i32", text)
        assert re.search(rf"grid_x = {math.ceil(300 / 128)} : i32, grid_y = 8 : i32", text)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["chunk_straddle_prefix", "ragged_gqa2_dim24",
                                  "chunk_2C+1_gqa2", "sees_nothing"])
def test_gpu_matches_reference_f32(case):
    out, ref = run_case(CASES[case], interpret=False)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [None, 1024])
def test_gpu_bf16_llama_shapes(chunk):
    case = (1, 3000, 3000, 40, 8, 128, True, chunk, None, None)
    out, ref = run_case(case, dtype=jnp.bfloat16, interpret=False, block=64)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=2e-2, rtol=2e-2)
