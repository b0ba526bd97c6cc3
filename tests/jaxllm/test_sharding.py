"""Sharded logits equal single-device logits; shardings are what the table says."""

from __future__ import annotations

import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxllm
from jaxllm.sharding import make_mesh, padded_vocab_size
from tests.support import REPO, hf_models

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)

V = hf_models.BASE["vocab_size"]  # 333: not divisible by 2, 4 or 8
# expert=8 does not divide the 4 experts: they are replicated over that axis, and still right.
MESHES = [dict(model=8), dict(data=2, model=4), dict(expert=2, model=4), dict(data=8),
          dict(expert=8)]


def _edge_ids() -> np.ndarray:
    """Every id on either side of every vocab-shard edge, for 2-, 4- and 8-way splits."""
    edges = {0, V - 1}
    for n in (2, 4, 8):
        rows = padded_vocab_size(V, make_mesh(model=n, data=8 // n)) // n
        for k in range(1, n):
            edges |= {k * rows - 1, k * rows}
    edges = sorted(e for e in edges if e < V)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (3, 40))
    ids[0, : len(edges)] = edges
    ids[1, -len(edges):] = edges[::-1]
    return ids


@pytest.fixture(scope="module")
def single(tiny_model):
    _, _, path = tiny_model("scout_unit_logits")
    ids = _edge_ids()
    ref = jaxllm.load_model(path).logits(ids)
    assert 1 < np.abs(ref).max() < 4  # the 1e-5 bounds below are about 1e-5 relative too
    return path, ids, ref


@pytest.mark.parametrize("shape", MESHES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_sharded_logits_equal_single_device(single, shape):
    path, ids, ref = single
    model = jaxllm.load_model(path, mesh=make_mesh(**shape))
    out = model.logits(ids)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def _shard_shape(array: jax.Array) -> tuple[int, ...]:
    shapes = {s.data.shape for s in array.addressable_shards}
    assert len(shapes) == 1
    return shapes.pop()


def test_parameter_shardings(tiny_model):
    path = tiny_model("scout")[2]
    model = jaxllm.load_model(path, mesh=make_mesh(expert=2, model=4))
    p = model.params
    D, Vp = 64, padded_vocab_size(V, model.mesh)
    assert Vp == 336
    embed, head = p["embed"][...], p["lm_head"][...]
    assert embed.shape == (Vp, D) and embed.sharding.spec == P("model", None)
    assert _shard_shape(embed) == (Vp // 4, D)
    assert head.sharding.spec == P(None, "model") and _shard_shape(head) == (D, Vp // 4)
    attn = p["layers"][0]["attn"]
    assert attn["wq"][...].sharding.spec == P(None, "model", None)  # 4 q heads over model=4
    assert _shard_shape(attn["wq"][...]) == (D, 1, 16)
    assert _shard_shape(attn["wo"][...]) == (1, 16, D)
    # 2 kv heads do not divide model=4: replicated (each device keeps both).
    assert _shard_shape(attn["wk"][...]) == (D, 2, 16)
    ffn = p["layers"][0]["ffn"]
    assert ffn["gate"][...].sharding.spec == P("expert", None, "model")
    assert _shard_shape(ffn["gate"][...]) == (2, D, 12)  # 4 experts / 2, ffn 48 / 4
    assert _shard_shape(ffn["down"][...]) == (2, 12, D)


def test_logits_stay_vocab_sharded_and_padding_never_wins(tiny_model):
    model = jaxllm.load_model(tiny_model("scout")[2], mesh=make_mesh(model=8))
    module = nnx.merge(model.graphdef, model.params)
    # Every real logit is -64; padded lm_head columns are zero, so an unmasked argmax would
    # pick a padded id.
    head = module.lm_head[...]
    negative = jnp.where(jnp.arange(head.shape[1]) < V, -1.0, head).astype(head.dtype)
    module.lm_head[...] = jax.device_put(negative, head.sharding)
    logits = jax.jit(module.logits)(jnp.ones((8, 64), jnp.float32))
    assert logits.sharding.spec[-1] == "model"
    assert logits.shape == (8, 336)
    assert np.all(np.asarray(logits)[:, V:] == -np.inf)
    assert np.all(np.asarray(jnp.argmax(logits, -1)) < V)


@pytest.mark.parametrize("bad", [V, -1, 10**6])
def test_out_of_vocabulary_ids_are_refused(tiny_model, bad):
    model = jaxllm.load_model(tiny_model("scout")[2])
    with pytest.raises(ValueError) as info:
        model.logits([[1, 2, bad, 3]])
    message = str(info.value)
    assert "out of vocabulary" in message and str(bad) in message and str(V) in message


@pytest.mark.parametrize("kwargs,message", [
    (dict(model=3), "= 3 devices, but 8 devices"),
    (dict(data=2, model=2), "= 4 devices, but 8"),
    (dict(model=0, data=8), "model=0 must be >= 1"),
])
def test_make_mesh_checks_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(**kwargs)


def test_make_mesh_axis_names():
    mesh = make_mesh(data=2, expert=2, model=2)
    assert mesh.axis_names == ("data", "expert", "model")
    assert dict(mesh.shape) == {"data": 2, "expert": 2, "model": 2}


def test_two_processes_form_one_mesh(single, tmp_path):
    """2 processes x 4 CPU devices via jax.distributed give the single-process logits."""
    path, ids, ref = single
    np.save(tmp_path / "ids.npy", ids)
    cmd = [sys.executable, str(REPO / "scripts" / "launch.py"), "--num-processes", "2",
           "--cpu-devices-per-process", "4", "--", sys.executable,
           str(REPO / "tests" / "jaxllm" / "multiprocess_worker.py"), str(path),
           str(tmp_path / "ids.npy"), str(tmp_path / "out.npy")]
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    print(f"two-process run took {time.monotonic() - start:.0f} s")
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [dict(model=8), dict(data=2, expert=2, model=2)],
                         ids=["model=8", "data=2,expert=2,model=2"])
def test_sharded_generate_equals_single_device(tiny_model, shape):
    path = tiny_model("scout")[2]
    prompts = [[5, 41, 42, 83], list(range(100, 137))]
    ref = jaxllm.generate(jaxllm.load_model(path, max_model_len=64), prompts, max_new_tokens=20)
    sharded = jaxllm.load_model(path, max_model_len=64, mesh=make_mesh(**shape))
    assert jaxllm.generate(sharded, prompts, max_new_tokens=20) == ref
