"""Prompts with images: jaxllm's logits and greedy tokens equal HF transformers'
``Llama4ForConditionalGeneration`` fed the same token ids and pixel values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxllm
from jaxllm.multimodal.prompt import ImageTokens, expand_prompt
from jaxllm.sharding import make_mesh
from tests.support import hf_models

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)

REL_TOL = 1e-4
TOKENS = ImageTokens.from_vocab(hf_models.TINY_IMAGE_TOKENS.get)
TOKENS_PER_TILE = 4  # TINY_VISION: 4 x 4 patches, pixel shuffle 0.5


def _prompt(grids: list[tuple[int, int]], seed: int) -> tuple[list[int], np.ndarray]:
    """Text, then each image placeholder among more text; ids and pixel values [N, 3, 28, 28]."""
    rng = np.random.default_rng(seed)
    ids = [1]
    for _ in grids:
        ids += rng.integers(7, 300, 5).tolist() + [TOKENS.image]
    ids += rng.integers(7, 300, 6).tolist()
    tiles = sum(r * c + (r * c > 1) for r, c in grids)
    pixels = rng.uniform(-1, 1, (tiles, 3, 28, 28)).astype(np.float32)
    return expand_prompt(ids, grids, TOKENS_PER_TILE, TOKENS), pixels


ONE_IMAGE = [(2, 2)]
THREE_IMAGES = [(1, 1), (2, 3), (1, 2)]


def _hf_logits(hf, ids: list[int], pixels: np.ndarray) -> np.ndarray:
    return hf_models.hf_image_logits(hf, [ids], torch.from_numpy(pixels))


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("mesh_shape", [None, dict(model=8), dict(data=2, model=4)])
@pytest.mark.parametrize("grids", [ONE_IMAGE, THREE_IMAGES], ids=["one", "three"])
def test_logits_with_images_match_hf(tiny_model, grids, mesh_shape):
    hf, _, path = tiny_model("multimodal_scout")
    mesh = None if mesh_shape is None else make_mesh(**mesh_shape)
    model = jaxllm.load_model(path, mesh=mesh)
    ids, pixels = _prompt(grids, seed=len(grids))
    ref = _hf_logits(hf, ids, pixels)
    ours = model.logits([ids], images=[pixels])
    assert ours.shape == ref.shape
    assert _rel_err(ours, ref) < REL_TOL
    # The images matter: without them (or with other pixels) the logits differ.
    other = model.logits([ids], images=[pixels[::-1].copy()])
    assert _rel_err(other, ref) > 100 * REL_TOL


def test_batch_of_prompts_takes_each_its_own_images(tiny_model):
    hf, _, path = tiny_model("multimodal_scout")
    model = jaxllm.load_model(path)
    a, pa = _prompt(ONE_IMAGE, seed=1)
    b, pb = _prompt([(1, 2), (1, 1)], seed=2)
    length = max(len(a), len(b))
    a, b = a + [9] * (length - len(a)), b + [9] * (length - len(b))
    text = [11] * length
    ours = model.logits([a, text, b], images=[pa, None, pb])
    for row, (ids, pixels) in ((0, (a, pa)), (2, (b, pb))):
        assert _rel_err(ours[row], _hf_logits(hf, ids, pixels)[0]) < REL_TOL
    assert _rel_err(ours[1], hf_models.hf_logits(hf, [text])[0]) < REL_TOL


def test_patch_count_must_match_the_images(tiny_model):
    model = jaxllm.load_model(tiny_model("multimodal_scout")[2])
    ids, pixels = _prompt(ONE_IMAGE, seed=0)
    with pytest.raises(ValueError, match="has 20 <.patch.> tokens, its images give 16 features"):
        model.logits([ids], images=[pixels[:4]])


@pytest.mark.parametrize("mesh_shape", [None, dict(model=8)])
def test_greedy_generate_with_images_matches_hf(tiny_model, mesh_shape):
    hf, _, path = tiny_model("multimodal_scout")
    mesh = None if mesh_shape is None else make_mesh(**mesh_shape)
    model = jaxllm.load_model(path, mesh=mesh, max_model_len=192)
    prompts = [_prompt(ONE_IMAGE, seed=3), _prompt(THREE_IMAGES, seed=4)]
    ours = jaxllm.generate(model, [ids for ids, _ in prompts], max_new_tokens=12,
                           images=[pixels for _, pixels in prompts])
    for (ids, pixels), got in zip(prompts, ours, strict=True):
        ref = hf_models.hf_image_generate(hf, ids, torch.from_numpy(pixels), 12)
        assert got == ref
        assert len(set(got)) > 2  # a varied continuation, not one repeated token


def test_no_compilation_after_warmup_with_images(tiny_model):
    from tests.support.compiles import count_compilations

    _, _, path = tiny_model("multimodal_scout")
    model = jaxllm.load_model(path, max_model_len=112, max_num_seqs=2)
    buckets = len(model.bucket_policy.batch_buckets) * len(model.bucket_policy.length_buckets)
    # Both variants of every bucket, and the encoder for 1, 2, 4, 8, 16 tiles.
    assert jaxllm.warmup(model, progress=False, max_tiles=9) == 2 * buckets + 5
    with count_compilations() as compiles:
        for seed, grids in enumerate([[(1, 1)], [(1, 2)], [(2, 2)], [(1, 1), (1, 3)]]):
            prompt = _prompt(grids, seed)
            text = [1] + list(range(7, 7 + seed + 3))
            outs = jaxllm.generate(model, [prompt[0], text], max_new_tokens=3,
                                   images=[prompt[1], None])
            assert len(outs) == 2
    assert compiles == []
