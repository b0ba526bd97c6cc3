"""Fixtures: tiny HF Llama 4 models, saved in shards and converted with the real script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, hf_models


def run_converter(hf_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """Runs scripts/convert_hf_to_orbax.py exactly as a user would."""
    cmd = [sys.executable, str(REPO / "scripts" / "convert_hf_to_orbax.py"),
           "--hf-dir", str(hf_dir), "--out", str(out), "--no-progress", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _legacy_rope(hf_dir: Path) -> None:
    """Rewrites config.json with the released checkpoints' spelling: rope_scaling + rope_theta."""
    path = hf_dir / "config.json"
    cfg = json.loads(path.read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params if params.get("rope_type") != "default" else None
    path.write_text(json.dumps(cfg))


VARIANTS = {
    "scout": lambda: hf_models.make_text_model(hf_models.SCOUT_LIKE),
    "maverick": lambda: hf_models.make_text_model(hf_models.MAVERICK_LIKE, seed=1),
    "tied": lambda: hf_models.make_text_model(
        dict(hf_models.SCOUT_LIKE, tie_word_embeddings=True), seed=2),
    # Logits of about unit scale, so float32 agreement can be stated in absolute terms.
    "scout_unit_logits": lambda: hf_models.make_text_model(hf_models.SCOUT_LIKE, seed=6,
                                                           scale=0.08),
    "scout_legacy_rope": lambda: hf_models.make_text_model(hf_models.SCOUT_LIKE, seed=3),
    # Attention chunks that do not fall on 16-token page boundaries.
    "scout_chunk20": lambda: hf_models.make_text_model(
        dict(hf_models.SCOUT_LIKE, attention_chunk_size=20), seed=7),
    "maverick_chunk24": lambda: hf_models.make_text_model(
        dict(hf_models.MAVERICK_LIKE, attention_chunk_size=24), seed=8),
    "scout_chunk1000": lambda: hf_models.make_text_model(
        dict(hf_models.SCOUT_LIKE, attention_chunk_size=1000, max_position_embeddings=4000),
        seed=9),
    "multimodal": lambda: hf_models.make_multimodal_model(hf_models.MAVERICK_LIKE, seed=4),
    "multimodal_scout": lambda: hf_models.make_multimodal_model(hf_models.SCOUT_LIKE, seed=5),
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``tiny_model(name)`` -> (HF torch model, HF dir, converted float32 jaxllm dir)."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            hf = VARIANTS[name]()
            hf_dir = hf_models.save(hf, root / "hf")
            if name.endswith("legacy_rope"):
                _legacy_rope(hf_dir)
            out = root / "jaxllm"
            result = run_converter(hf_dir, out, "--dtype", "float32")
            assert result.returncode == 0, result.stderr
            cache[name] = (hf, hf_dir, out)
        return cache[name]

    return get


def random_model(attention_impl: str | None = "xla", *, max_model_len: int = 32,
                 page_size: int = 8, seed: int = 0):
    """A one-layer Llama 4 ``Model`` with random float32 weights, built in memory (no HF, no
    conversion): for tests of the handle and the attention registry, not of parity."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxllm.buckets import BucketPolicy
    from jaxllm.config import Llama4Config
    from jaxllm.kv_cache import CacheConfig
    from jaxllm.runtime.handle import Model
    from jaxllm.weights.loading import abstract_model

    config = Llama4Config.from_hf(dict(hf_models.SCOUT_LIKE, num_hidden_layers=1,
                                       model_type="llama4_text"))
    graphdef, state = abstract_model(config, jnp.float32)
    rng = np.random.default_rng(seed)

    def fill(leaf):
        return np.asarray(rng.normal(0.0, 0.2, leaf.shape), np.float32)

    nnx.replace_by_pure_dict(state, _map_leaves(fill, nnx.to_pure_dict(state)))
    policy = BucketPolicy(max_model_len=max_model_len,
                          cache=CacheConfig(page_size=page_size, dtype=jnp.float32))
    return Model(config, graphdef, state, dtype=jnp.float32, bucket_policy=policy,
                 attention_impl=attention_impl)


def _map_leaves(fn, tree):
    if isinstance(tree, dict):
        return {k: _map_leaves(fn, v) for k, v in tree.items()}
    return fn(tree)
