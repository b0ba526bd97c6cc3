"""The vision tower + projector equal HF transformers' ``Llama4VisionModel`` +
``Llama4MultiModalProjector`` on the same converted weights, on one and eight devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxllm
from jaxllm.sharding import make_mesh

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)

REL_TOL = 1e-4


def _hf_features(hf, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = hf.vision_model(torch.from_numpy(pixels)).last_hidden_state
        return hf.multi_modal_projector(out).numpy()


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _pixels(tiles: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (tiles, 3, 28, 28)).astype(np.float32)


@pytest.mark.parametrize("mesh_shape", [None, dict(model=8), dict(data=2, model=2, expert=2)])
def test_image_features_match_hf(tiny_model, mesh_shape):
    hf, _, path = tiny_model("multimodal_scout")
    mesh = None if mesh_shape is None else make_mesh(**mesh_shape)
    model = jaxllm.load_model(path, mesh=mesh)
    for tiles in (1, 3, 5):  # buckets 1, 4, 8: padding tiles never leak into real ones
        pixels = _pixels(tiles, seed=tiles)
        ours = model.encode_images(pixels)
        ref = _hf_features(hf, pixels)
        assert ours.shape == ref.shape == (tiles, 4, hf_hidden(hf))
        assert _rel_err(ours, ref) < REL_TOL


def hf_hidden(hf) -> int:
    return hf.config.text_config.hidden_size


def test_every_vision_weight_matters(tiny_model):
    """Each weight group changes the features (none is silently unused or misplaced)."""
    _, _, path = tiny_model("multimodal_scout")
    model = jaxllm.load_model(path)
    pixels = _pixels(2)
    base = model.encode_images(pixels)
    state = model.params["vision"]
    for name in ("patch_embed", "class_embedding", "positional_embedding", "adapter_fc1",
                 "projector"):
        saved = state[name][...]
        state[name][...] = saved * 1.5
        model._compiled.clear()
        assert not np.allclose(model.encode_images(pixels), base, rtol=1e-3), name
        state[name][...] = saved
    model._compiled.clear()
    np.testing.assert_array_equal(model.encode_images(pixels), base)


def test_text_model_without_vision_refuses_images(tiny_model):
    _, _, path = tiny_model("scout")
    with pytest.raises(ValueError, match="no vision tower"):
        jaxllm.load_model(path).encode_images(_pixels(1))
