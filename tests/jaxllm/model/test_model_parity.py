"""Logits of jaxllm equal HF transformers' Llama 4 on the same converted weights."""

from __future__ import annotations

import dataclasses

import jax
import jax.nn as jax_nn
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxllm
from jaxllm.model import llama4 as model_lib
from jaxllm.runtime.handle import Model
from jaxllm.weights.loading import abstract_model
from tests.support import hf_models

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)

# Float32 on CPU. Max |ours - HF| over all logits, relative to the largest |HF logit|.
REL_TOL = 1e-4
# A sequence 70 tokens long crosses four boundaries of the 16-token attention chunk and
# reaches temperature-tuning scale floor(71 / 8) = 8, so every feature changes the result.
LENGTH = 70


def _ids(batch: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, hf_models.BASE["vocab_size"], (batch, length)).tolist()


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", ["scout", "maverick", "tied", "scout_legacy_rope",
                                  "multimodal", "multimodal_scout"])
def test_logits_match_hf(tiny_model, name):
    hf, _, path = tiny_model(name)
    ids = _ids(3, LENGTH)
    ours = jaxllm.load_model(path).logits(ids)
    ref = hf_models.hf_logits(hf, ids)
    assert ours.shape == ref.shape == (3, LENGTH, hf_models.BASE["vocab_size"])
    assert ours.dtype == np.float32
    assert _rel_err(ours, ref) < REL_TOL


def test_config_features_are_read(tiny_model):
    scout = jaxllm.load_model(tiny_model("scout")[2]).config
    maverick = jaxllm.load_model(tiny_model("maverick")[2]).config
    assert scout.moe_layers == (0, 1, 2, 3) and maverick.moe_layers == (1, 3)
    assert scout.rope_layers == (True, True, True, False)
    assert scout.chunk_size(0) == 16 and scout.chunk_size(3) is None
    assert scout.rope_scaling is not None and maverick.rope_scaling is None
    assert scout.uses_qk_norm(0) and not scout.uses_qk_norm(3) and not maverick.uses_qk_norm(0)
    legacy = jaxllm.load_model(tiny_model("scout_legacy_rope")[2]).config
    assert legacy.rope_scaling == scout.rope_scaling and legacy.rope_theta == scout.rope_theta


def test_single_token_and_batch_one(tiny_model):
    hf, _, path = tiny_model("maverick")
    model = jaxllm.load_model(path)
    for ids in ([[5]], _ids(1, 17, seed=3)):
        assert _rel_err(model.logits(ids), hf_models.hf_logits(hf, ids)) < REL_TOL


def _with_config(model: Model, **changes) -> Model:
    config = dataclasses.replace(model.config, **changes)
    graphdef, _ = abstract_model(config, model.dtype)
    return Model(config, graphdef, model.params, dtype=model.dtype,
                 bucket_policy=model.bucket_policy)


def _rotate_half(x, positions, inv_freq):
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return (x * cos + rotated * sin).astype(x.dtype)


SCOUT_ABLATIONS = {
    "no chunked attention": dict(chunked_layers=(False,) * 4),
    "chunking on the NoPE layer instead": dict(chunked_layers=(False, False, False, True)),
    "RoPE on every layer": dict(rope_layers=(True,) * 4),
    "no QK norm": dict(use_qk_norm=False),
    "no temperature tuning": dict(attn_temperature_tuning=False),
    "no llama3 rope scaling": dict(rope_scaling=None),
}


@pytest.fixture(autouse=True)
def _fresh_traces():
    yield
    jax.clear_caches()  # monkeypatched functions must not leak into later tests


@pytest.mark.parametrize("ablation", list(SCOUT_ABLATIONS))
def test_each_feature_matters(tiny_model, ablation):
    hf, _, path = tiny_model("scout")
    ids = _ids(2, LENGTH, seed=7)
    ref = hf_models.hf_logits(hf, ids)
    broken = _with_config(jaxllm.load_model(path), **SCOUT_ABLATIONS[ablation]).logits(ids)
    assert _rel_err(broken, ref) > 100 * REL_TOL


def test_interleaved_rope_pairs_matter(tiny_model, monkeypatch):
    hf, _, path = tiny_model("scout")
    ids = _ids(1, LENGTH, seed=8)
    monkeypatch.setattr(model_lib, "apply_rope", _rotate_half)
    jax.clear_caches()  # the forward is traced anew with the patched function
    assert _rel_err(jaxllm.load_model(path).logits(ids), hf_models.hf_logits(hf, ids)) > 1e-2


def test_routed_input_scaling_matters(tiny_model, monkeypatch):
    """Scaling the routed expert's output instead of its input (a common port bug) differs."""
    hf, _, path = tiny_model("scout")
    ids = _ids(1, LENGTH, seed=9)

    def output_scaled(self, x):
        logits = x @ self.router[...]
        score = jax_nn.sigmoid(logits.max(-1, keepdims=True))
        expert = logits.argmax(-1)
        h = jax_nn.silu(jnp.einsum("TD,TDF->TF", x, self.gate[...][expert]))
        h = h * jnp.einsum("TD,TDF->TF", x, self.up[...][expert])
        return score * jnp.einsum("TF,TFD->TD", h, self.down[...][expert]) + self.shared(x)

    model = jaxllm.load_model(path)
    assert _rel_err(model.logits(ids), hf_models.hf_logits(hf, ids)) < REL_TOL
    monkeypatch.setattr(model_lib.MoE, "__call__", output_scaled)
    jax.clear_caches()
    assert _rel_err(jaxllm.load_model(path).logits(ids), hf_models.hf_logits(hf, ids)) > 1e-3


def test_pallas_attention_impl_matches_hf(tiny_model):
    """The model through the Pallas ragged paged kernel (interpret mode off GPU)."""
    hf, _, path = tiny_model("scout")
    ids = _ids(2, 40, seed=11)
    model = jaxllm.load_model(path, attention_impl="pallas")
    assert model.attention_impl == "pallas"
    assert _rel_err(model.logits(ids), hf_models.hf_logits(hf, ids)) < REL_TOL


def test_too_long_input_is_refused(tiny_model):
    model = jaxllm.load_model(tiny_model("scout")[2], max_model_len=20)
    with pytest.raises(ValueError, match="maximum context length is 20 tokens. However, you "
                                         "requested 21 tokens"):
        model.logits(_ids(1, 21))


def test_unknown_attention_impl_is_refused(tiny_model):
    with pytest.raises(ValueError, match="attention_impl='cuda'"):
        jaxllm.load_model(tiny_model("scout")[2], attention_impl="cuda")


def test_eagle3_features_are_hf_hidden_states(tiny_model):
    """``forward(aux_layers=...)``: the residual stream entering each named layer (vLLM's
    EAGLE-3 numbering) equals HF's ``hidden_states[i]`` (the input of layer i, the embeddings
    for i = 0), concatenated in layer order."""
    import torch

    from jaxllm.kv_cache import init_kv_cache
    from jaxllm.layout import (
        SeqPiece,
        build_step,
        contiguous_num_pages,
        contiguous_pages,
        pages_for,
    )

    hf, _, path = tiny_model("scout")
    model = jaxllm.load_model(path)
    ids = np.asarray(_ids(2, 40, seed=5))
    with torch.no_grad():
        states = hf(input_ids=torch.tensor(ids), output_hidden_states=True,
                    use_cache=False).hidden_states
    width = pages_for(40, model.bucket_policy.page_size)
    cache = model.bucket_policy.cache.contiguous(contiguous_num_pages(1, 2, width))
    step = build_step([SeqPiece([contiguous_pages(0, s, 2, width)], 0, ids[s]) for s in range(2)],
                      cache, width=width, num_rows=80, num_slots=2)

    def features(params, tokens, meta, aux):
        m = nnx.merge(model.graphdef, params)
        return m.forward(tokens, init_kv_cache(m.config, cache), meta, aux_layers=aux)[2]

    for aux in [(3, 0, 2), (1,)]:
        ours = np.asarray(jax.jit(features, static_argnums=3)(model.params, step.tokens,
                                                              step.meta, aux))
        want = np.concatenate([states[i].numpy().reshape(80, -1) for i in sorted(aux)], -1)
        assert ours.shape == want.shape
        assert _rel_err(ours, want) < REL_TOL
    with pytest.raises(ValueError, match=r"aux_layers \[4\] outside \[0, 4\)"):
        features(model.params, step.tokens, step.meta, (1, 4))
