"""Images through the serving engine: greedy tokens equal HF transformers'
``Llama4ForConditionalGeneration`` (reference embeddings assembled from HF's own vision tower,
projector and ``masked_scatter``), with chunked prefill cutting through images, the prefix
cache keyed by image content, the encoder run once per image, preemption and recompute,
and no compile after warm-up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxllm
from jaxllm import SamplingParams
from jaxllm.engine import Engine
from jaxllm.multimodal.prompt import ImageTokens, expand_prompt
from jaxllm.sharding import make_mesh
from tests.support import hf_models
from tests.support.compiles import count_compilations

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)

TOKENS = ImageTokens.from_vocab(hf_models.TINY_IMAGE_TOKENS.get)
TOKENS_PER_TILE = 4  # TINY_VISION: 4 x 4 patches, pixel shuffle 0.5
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)


def _prompt(grids, seed: int, lead: int = 5, pixels: np.ndarray | None = None):
    """``lead`` text tokens, then each image placeholder after 5 more; ids and tiles."""
    rng = np.random.default_rng(seed)
    ids = [1] + rng.integers(7, 300, lead).tolist()
    for _ in grids:
        ids += rng.integers(7, 300, 5).tolist() + [TOKENS.image]
    ids += rng.integers(7, 300, 6).tolist()
    tiles = sum(r * c + (r * c > 1) for r, c in grids)
    if pixels is None:
        pixels = rng.uniform(-1, 1, (tiles, 3, 28, 28)).astype(np.float32)
    return expand_prompt(ids, grids, TOKENS_PER_TILE, TOKENS), pixels


def _hf(hf, ids, pixels, n: int = 10) -> list[int]:
    return hf_models.hf_image_generate(hf, ids, torch.from_numpy(pixels), n)


def _split(pixels: np.ndarray, grids) -> list[np.ndarray]:
    """A prompt's tiles per image (an image of r x c tiles has a global tile when r·c > 1)."""
    counts = [r * c + (r * c > 1) for r, c in grids]
    return np.split(pixels, np.cumsum(counts)[:-1])


def _run(engine: Engine, requests) -> list[list[int]]:
    """Runs (ids, images) requests together; their tokens, and each one's output records."""
    ids = [engine.add_request(p, GREEDY, images=images) for p, images in requests]
    got: dict[str, list[int]] = {i: [] for i in ids}
    outputs: dict[str, object] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
            outputs[out.request_id] = out
    return [got[i] for i in ids], [outputs[i] for i in ids]


ONE = [(2, 2)]
THREE = [(1, 1), (2, 3), (1, 2)]


@pytest.fixture(scope="module")
def multimodal(tiny_model):
    hf, _, path = tiny_model("multimodal_scout")
    return hf, jaxllm.load_model(path, max_model_len=192, page_size=8, max_num_seqs=4)


@pytest.mark.parametrize("budget", [16, 256], ids=["chunks-cut-images", "whole"])
def test_greedy_with_one_and_three_images_equals_hf(multimodal, budget):
    hf, model = multimodal
    engine = Engine(model, max_num_batched_tokens=budget)
    one, three = _prompt(ONE, seed=1), _prompt(THREE, seed=2)
    text = [1] + list(range(40, 60))
    outs, _ = _run(engine, [(one[0], _split(one[1], ONE)), (text, ()),
                            (three[0], _split(three[1], THREE))])
    assert outs[0] == _hf(hf, *one)
    assert outs[2] == _hf(hf, *three)
    with torch.no_grad():
        ref = hf.language_model.generate(torch.tensor([text]), max_new_tokens=10,
                                         do_sample=False)
    assert outs[1] == ref[0, len(text):].tolist()
    assert len(set(outs[2])) > 2  # a varied continuation
    assert engine.images.num_encoded == 4  # once per distinct image
    if budget == 16:  # 16-token pieces cut through the 2 x 2 image's 24 patch rows
        assert len(one[0]) > 2 * budget


@pytest.mark.slow  # about a minute on a shared 2-core CPU
def test_a_chunk_that_cuts_through_an_image_takes_its_rows(multimodal):
    """A piece boundary inside each tile's run of <|patch|> tokens, for several cut points."""
    hf, model = multimodal
    ids, pixels = _prompt([(1, 3)], seed=3)
    ref = _hf(hf, ids, pixels)
    for budget in (9, 13):
        engine = Engine(model, max_num_batched_tokens=budget)
        assert _run(engine, [(ids, _split(pixels, [(1, 3)]))])[0] == [ref]


def test_prefix_cache_keys_pages_by_image(multimodal):
    hf, model = multimodal
    engine = Engine(model, max_num_batched_tokens=64)
    grids = [(1, 2)]
    ids, pixels = _prompt(grids, seed=4, lead=20)  # 2 text-only pages before the image
    other = _prompt(grids, seed=4, lead=20, pixels=np.random.default_rng(40).uniform(
        -1, 1, pixels.shape).astype(np.float32))
    assert other[0] == ids
    first = _run(engine, [(ids, _split(pixels, grids))])
    again = _run(engine, [(ids, _split(pixels, grids))])
    moved = _run(engine, [(ids, _split(other[1], grids))])
    assert first[0] == again[0] == [_hf(hf, ids, pixels)]
    # Its own image's continuation (a page shared with the first image would not give it:
    # the cached-token count below says none past the text is).
    assert moved[0] == [_hf(hf, ids, other[1])]
    assert first[1][0].num_cached_tokens == 0
    assert again[1][0].num_cached_tokens == (len(ids) - 1) // 8 * 8  # all full pages
    image_start = ids.index(TOKENS.patch)
    assert moved[1][0].num_cached_tokens == image_start // 8 * 8 == 24  # the text pages only
    assert engine.images.num_encoded == 2  # the first image once, the other once


@pytest.mark.slow  # about a minute on a shared 2-core CPU
def test_preemption_and_an_encoder_cache_of_one_image(multimodal):
    """Too few pages for four image prompts and an encoder cache that holds one largest
    image: pieces wait for room, requests are preempted and recomputed (their images encoded
    again once evicted), and every output still equals HF's."""
    hf, model = multimodal
    prompts = [_prompt(THREE, seed=5), _prompt(ONE, seed=6), _prompt([(2, 3)], seed=7),
               _prompt([(1, 2), (1, 1)], seed=8)]
    grids = [THREE, ONE, [(2, 3)], [(1, 2), (1, 1)]]
    engine = Engine(model, num_pages=48, max_num_batched_tokens=32, max_image_tiles=7,
                    encoder_cache_rows=7 * TOKENS_PER_TILE)
    outs, _ = _run(engine, [(p, _split(px, g)) for (p, px), g in zip(prompts, grids,
                                                                     strict=True)])
    assert outs == [_hf(hf, p, px) for p, px in prompts]
    assert engine.scheduler.num_preemptions > 0
    assert engine.images.num_encoded > 6  # some of the 6 images encoded again
    assert engine.pages.num_free == 48


def test_requests_with_images_are_checked_at_admission(multimodal, tiny_model):
    _, model = multimodal
    engine = Engine(model)
    ids, pixels = _prompt(ONE, seed=9)
    with pytest.raises(ValueError, match="has 20 <.patch.> tokens, its images give 16"):
        engine.prepare(ids, GREEDY, images=[pixels[:4]])
    with pytest.raises(ValueError, match=r"tiles must be \[1..17, 3, 28, 28\]"):
        engine.prepare(ids, GREEDY, images=[pixels[:, :, :14]])
    text = Engine(jaxllm.load_model(tiny_model("scout")[2], max_model_len=64))
    with pytest.raises(ValueError, match="this model has no vision tower"):
        text.prepare(ids[:40], GREEDY, images=[pixels])


@pytest.mark.slow  # about a minute on a shared 2-core CPU
def test_no_compilation_after_warmup_with_images(multimodal):
    _, model = multimodal
    engine = Engine(model, max_num_batched_tokens=32)
    shapes = len(engine.policy.step_shapes())
    # Each step shape with and without image features; the encoder for 1 .. 32 tiles.
    assert engine.warmup(progress=False) == 2 * shapes + 6
    with count_compilations() as compiles:
        requests = [_prompt(g, seed=10 + i) for i, g in enumerate([[(1, 1)], [(1, 2)],
                                                                   [(2, 2)], THREE])]
        grids = [[(1, 1)], [(1, 2)], [(2, 2)], THREE]
        _run(engine, [(p, _split(px, g)) for (p, px), g in zip(requests, grids, strict=True)]
             + [([1, 5, 6, 7], ())])
    assert compiles == []


@pytest.mark.slow  # about a minute on a shared 2-core CPU
def test_greedy_with_images_on_eight_devices_equals_hf(tiny_model):
    hf, _, path = tiny_model("multimodal_scout")
    model = jaxllm.load_model(path, max_model_len=192, page_size=8, max_num_seqs=4,
                              mesh=make_mesh(model=8))
    engine = Engine(model, max_num_batched_tokens=16)
    three = _prompt(THREE, seed=2)
    assert _run(engine, [(three[0], _split(three[1], THREE))])[0] == [_hf(hf, *three)]


def test_speculation_beside_image_prefills_compiles_nothing_after_warmup(multimodal):
    """n-gram drafts while image prompts are prefilled in chunks: a step that takes image
    features verifies no drafts (so no verifying program has an image variant), the others
    do; outputs equal HF's and nothing compiles after warm-up."""
    from jaxllm.engine.spec_decode.config import SpeculativeConfig

    hf, model = multimodal
    engine = Engine(model, max_num_batched_tokens=32, speculative=SpeculativeConfig(
        method="ngram", num_speculative_tokens=3, prompt_lookup_min=1, prompt_lookup_max=3))
    shapes = len(engine.policy.step_shapes())
    verifying = engine.warmup(progress=False) - 2 * shapes - 6  # the encoder: 6 tile buckets
    assert 0 < verifying <= shapes  # verifying programs, none with image features
    one, three = _prompt(ONE, seed=1), _prompt(THREE, seed=2)
    # The text request, its prompt short, decodes 17s (biased) while the image prompts are
    # prefilled 32 rows a step: 17 recurs in its prompt, so it has drafts every step.
    text = [1] + [17, 40, 17, 40, 5] * 2
    forced = SamplingParams(temperature=0.0, max_tokens=10, logit_bias=((17, 50.0),))
    ids = [engine.add_request(text, forced)]
    ids += [engine.add_request(p, GREEDY, images=_split(px, g))
            for (p, px), g in ((one, ONE), (three, THREE))]
    got = {i: [] for i in ids}
    with count_compilations() as compiles:
        while engine.has_unfinished():
            for out in engine.step():
                got[out.request_id] += out.new_token_ids
    assert compiles == []
    assert got[ids[1]] == _hf(hf, *one) and got[ids[2]] == _hf(hf, *three)
    assert got[ids[0]] == [17] * 10
    assert engine.speculator.stats.num_drafts > 0
