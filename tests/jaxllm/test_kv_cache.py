"""The KV cache: its configuration's checks and sizes, its sharding, and the page writer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import Llama4Config
from jaxllm.kv_cache import (
    CacheConfig,
    init_kv_cache,
    kv_cache_sharding,
    layer_groups,
    write_kv_pages,
)
from jaxllm.sharding import make_mesh
from tests.support import hf_models

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)


def _config() -> Llama4Config:
    return Llama4Config.from_hf(dict(hf_models.SCOUT_LIKE, model_type="llama4_text"))


def test_cache_config_checks_and_sizes():
    config = _config()
    cache = CacheConfig(page_size=8, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="no size yet"):
        cache.page_shape(config)
    sized = cache.with_pages(5)
    # Five pages to hand out and the null page 0.
    assert sized.page_shape(config) == (6, 8, config.num_kv_heads, config.head_dim)
    # (K, V) x kv heads x head dim x 2 bytes, in one layer.
    per_token = 2 * config.num_kv_heads * config.head_dim * 2
    assert cache.bytes_per_token(config) == per_token
    # A page id is a page in every slab: every layer without the hybrid cache, one layer
    # with it (three chunked layers and one global one: groups of gcd(3, 1) = 1 layer).
    assert cache.bytes_per_page(config) == config.num_layers * 8 * per_token
    hybrid = CacheConfig(page_size=8, dtype=jnp.bfloat16, hybrid=True)
    assert hybrid.bytes_per_page(config) == 8 * per_token
    for bad in (dict(page_size=0), dict(num_pages=0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            CacheConfig(**bad)


def test_init_kv_cache_shards_kv_heads_over_model():
    config = _config()
    cache = CacheConfig(page_size=4, dtype=jnp.float32, num_pages=3)
    mesh = make_mesh(model=2, devices=jax.devices()[:2])
    layers = init_kv_cache(config, cache, mesh)
    assert len(layers) == config.num_layers  # one slab per layer without the hybrid cache
    k = layers[0][0]
    assert k.shape == (4, 4, config.num_kv_heads, config.head_dim) and k.dtype == jnp.float32
    assert not np.any(np.asarray(k))
    spec = kv_cache_sharding(config, cache, mesh).spec
    assert spec[2] == "model"


def test_write_kv_pages_drops_padding_slots():
    k_pages = jnp.zeros((3, 4, 1, 2))
    new = jnp.arange(1.0, 6.0)[:, None, None] * jnp.ones((5, 1, 2))
    slots = jnp.array([5, -1, 0, -1, 11], jnp.int32)
    k_out, v_out = write_kv_pages(k_pages, k_pages, new, -new, slots)
    flat = np.asarray(k_out).reshape(12, 2)
    want = np.zeros((12, 2))
    want[5], want[0], want[11] = 1.0, 3.0, 5.0
    np.testing.assert_array_equal(flat, want)
    np.testing.assert_array_equal(np.asarray(v_out).reshape(12, 2), -want)
    # Only padding: nothing is written, in particular not the last slot (index -1 wrapped).
    k_out, _ = write_kv_pages(k_pages, k_pages, new[:2], new[:2], jnp.array([-1, -1]))
    assert not np.any(np.asarray(k_out))




def test_layer_groups():
    """Scout-like: layers 0-2 chunked, 3 global. Hybrid: a group per layer, in one slab;
    otherwise one group and a slab per layer. Scout's 36 chunked + 12 global layers make
    groups of 12 (gcd), so 4 groups and 12 slabs."""
    config = _config()
    hybrid = layer_groups(config, hybrid=True)
    assert hybrid.group_chunk == (None, 16, 16, 16)
    assert hybrid.layer_group == (1, 2, 3, 0) and hybrid.layer_slab == (0, 0, 0, 0)
    plain = layer_groups(config, hybrid=False)
    assert plain.group_chunk == (None,) and plain.layer_slab == (0, 1, 2, 3)
    scout = Llama4Config.from_hf(dict(hf_models.SCOUT_LIKE, model_type="llama4_text",
                                      num_hidden_layers=48, attention_chunk_size=8192))
    groups = layer_groups(scout, hybrid=True)
    assert (groups.num_groups, groups.num_slabs) == (4, 12)
    assert groups.group_chunk == (None, 8192, 8192, 8192)
    for g in range(4):  # every group has one layer in every slab
        assert sorted(s for s, gg in zip(groups.layer_slab, groups.layer_group, strict=True)
                      if gg == g) == list(range(12))
    assert [i for i in range(48) if groups.layer_group[i] == 0] == list(range(3, 48, 4))


def test_fp8_kv_cache_through_the_model_and_the_engine(tiny_model):
    """``kv_cache_dtype="fp8"``: every attention impl reads the same e4m3 cache (equal
    logits), the logits move by e4m3 rounding only, the engine serves from it, and a page
    costs half the bytes of a bf16 one."""
    import jax.numpy as jnp
    import numpy as np

    import jaxllm
    from jaxllm import SamplingParams
    from jaxllm.engine import Engine
    from jaxllm.weights.loading import kv_cache_dtype_of

    hf, _, path = tiny_model("scout_unit_logits")
    ids = np.random.default_rng(0).integers(0, 333, (2, 40)).tolist()
    plain = jaxllm.load_model(path).logits(ids)
    outs = {}
    for impl in ("reference", "xla"):
        model = jaxllm.load_model(path, kv_cache_dtype="fp8", attention_impl=impl,
                                  max_model_len=64, page_size=8, max_num_seqs=4)
        assert model.bucket_policy.cache.dtype == jnp.float8_e4m3fn
        outs[impl] = model.logits(ids)
    np.testing.assert_allclose(outs["xla"], outs["reference"], atol=1e-5, rtol=0)
    change = np.abs(outs["xla"] - plain).max() / np.abs(plain).max()
    assert 1e-4 < change < 0.15, change  # e4m3 keeps 3 mantissa bits: ~6% per element
    prompts = [ids[0][:9], ids[1][:23]]
    engine = Engine(model, max_num_batched_tokens=16)
    served = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
    assert served == jaxllm.generate(model, prompts, max_new_tokens=8)
    bf16 = model.bucket_policy.cache.__class__(dtype=jnp.bfloat16)
    fp8 = bf16.__class__(dtype=kv_cache_dtype_of("fp8", jnp.bfloat16))
    assert fp8.bytes_per_token(model.config) * 2 == bf16.bytes_per_token(model.config)
