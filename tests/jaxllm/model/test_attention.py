"""The attention registry: names, default, unknown names, a newly registered implementation
being the one the model runs; and on a mesh, the Pallas kernel running per head shard (no
gather of the KV cache or q) and still equal to a naive per-sequence attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.layout import AttentionMetadata
from jaxllm.model import attention
from jaxllm.model.attention import head_shard_specs, paged_attention
from jaxllm.sharding import make_mesh
from tests.jaxllm.conftest import random_model
from tests.pallas_kernels.triton.test_ragged_paged_attention import make_batch, naive_attention


@pytest.fixture
def registry(monkeypatch):
    """The registry, restored after the test (so test implementations do not leak)."""
    monkeypatch.setattr(attention, "_IMPLS", dict(attention._IMPLS))
    return attention


def test_todays_names_are_registered():
    assert {"xla", "pallas"} <= set(attention.attention_impls())


def test_default_is_pallas_on_gpu_and_xla_elsewhere():
    expected = "pallas" if jax.default_backend() == "gpu" else "xla"
    assert attention.default_attention_impl() == expected
    assert attention.check_attention_impl(None) == expected


def test_known_names_pass_and_unknown_names_are_refused():
    assert attention.check_attention_impl("xla") == "xla"
    assert attention.check_attention_impl("pallas") == "pallas"
    with pytest.raises(ValueError, match=r"attention_impl='flash': expected one of \("):
        attention.check_attention_impl("flash")


def test_a_name_cannot_be_registered_twice(registry):
    with pytest.raises(ValueError, match="'xla' is already registered"):
        registry.register("xla")(lambda *a, **k: None)


def test_paged_attention_dispatches_by_name(registry):
    calls = []

    @registry.register("test-echo")
    def echo(q, k_pages, v_pages, meta, *, chunk_size, mesh):
        calls.append(chunk_size)
        return q * 2

    assert "test-echo" in registry.attention_impls()
    assert registry.check_attention_impl("test-echo") == "test-echo"
    q = jnp.ones((3, 2, 4))
    meta = AttentionMetadata(*(jnp.zeros(1, jnp.int32) for _ in range(6)))
    out = registry.paged_attention(q, None, None, meta, chunk_size=16, impl="test-echo")
    np.testing.assert_array_equal(out, 2 * np.ones((3, 2, 4)))
    assert calls == [16]


def test_a_registered_implementation_is_what_the_model_runs(registry):
    seen = []

    @registry.register("test-zeros")
    def zeros(q, k_pages, v_pages, meta, *, chunk_size, mesh):
        seen.append((q.shape, k_pages.shape[1], meta.block_tables.shape, chunk_size))
        return jnp.zeros_like(q)

    ids = [[3, 1, 4, 1, 5]]
    reference = random_model("xla").logits(ids)
    replaced = random_model("test-zeros").logits(ids)
    # One layer of 4 heads of 16 dims over 5 rows; pages of 8 tokens, tables ceil(5 / 8) wide;
    # the layer uses the 16-token attention chunk.
    assert seen == [((5, 4, 16), 8, (1, 1), 16)]
    assert replaced.shape == reference.shape
    assert not np.allclose(replaced, reference, atol=1e-3)


SEQS = [(1, 23), (12, 12), (5, 30), (1, 1)]


Q_HEADS = PartitionSpec(None, "model", None)
KV_HEADS = PartitionSpec(None, None, "model", None)


def _attend(batch, mesh, impl, chunk_size, q_spec=Q_HEADS, kv_spec=KV_HEADS):
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    q, kp, vp = put(batch.q, q_spec), put(batch.k_pages, kv_spec), put(batch.v_pages, kv_spec)
    rows = batch.q.shape[0]
    meta = AttentionMetadata(np.zeros(rows, np.int32), np.zeros(rows, np.int32),
                             batch.block_tables, batch.seq_lens, batch.query_start_loc,
                             batch.num_seqs)
    fn = jax.jit(lambda q, kp, vp, meta: paged_attention(
        q, kp, vp, meta, chunk_size=chunk_size, impl=impl, mesh=mesh))
    hlo = fn.lower(q, kp, vp, meta).compile().as_text()
    return np.asarray(fn(q, kp, vp, meta)), hlo


@pytest.mark.parametrize("chunk_size", [None, 16])
def test_pallas_attention_runs_per_head_shard(chunk_size):
    batch = make_batch(SEQS, heads=8, kv_heads=4, head_dim=16, width=8)
    mesh = make_mesh(data=2, model=4)
    assert head_shard_specs(batch.q.shape, batch.k_pages.shape, mesh) is not None
    out, hlo = _attend(batch, mesh, "pallas", chunk_size)
    assert "all-gather" not in hlo
    real = int(batch.query_start_loc[int(batch.num_seqs)])
    np.testing.assert_allclose(out[:real], naive_attention(batch, chunk_size)[:real],
                               atol=1e-5, rtol=1e-5)


def test_kv_heads_the_mesh_does_not_split_run_unsharded():
    """8 model shards, 4 kv heads: the cache keeps its kv heads whole, so the kernel cannot
    run per shard; it runs once on the whole arrays and is still right."""
    batch = make_batch(SEQS, heads=8, kv_heads=4, head_dim=16, width=8)
    mesh = make_mesh(model=8)
    assert head_shard_specs(batch.q.shape, batch.k_pages.shape, mesh) is None
    assert head_shard_specs(batch.q.shape, batch.k_pages.shape, None) is None
    out, _ = _attend(batch, mesh, "pallas", 16, Q_HEADS, PartitionSpec())
    real = int(batch.query_start_loc[int(batch.num_seqs)])
    np.testing.assert_allclose(out[:real], naive_attention(batch, 16)[:real], atol=1e-5,
                               rtol=1e-5)
    q_spec, kv_spec = head_shard_specs(batch.q.shape, batch.k_pages.shape, make_mesh(model=4,
                                                                                     data=2))
    assert (q_spec, kv_spec) == (Q_HEADS, KV_HEADS)
