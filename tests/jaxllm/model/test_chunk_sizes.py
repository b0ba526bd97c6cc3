"""Attention chunks that do not fall on page boundaries (chunk 20 or 24 with 16-token pages,
chunk 1000 at max_model_len 4000): load_model defaults, logits, generate() and the engine all
equal HF transformers."""

from __future__ import annotations

import numpy as np
import pytest

import jaxllm
from jaxllm import SamplingParams
from jaxllm.engine import Engine
from tests.jaxllm.runtime.test_generate import _prompts, hf_greedy
from tests.support import hf_models

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)

REL_TOL = 1e-4


@pytest.mark.parametrize("name", ["scout_chunk20", "maverick_chunk24"])
def test_chunk_not_a_multiple_of_the_page(tiny_model, name):
    hf, _, path = tiny_model(name)
    model = jaxllm.load_model(path, max_model_len=90)  # default page size 16
    assert model.bucket_policy.page_size == 16 and model.config.attention_chunk_size % 16
    ids = _prompts([70, 70], seed=2)
    want = hf_models.hf_logits(hf, ids)
    got = model.logits(ids)
    assert np.abs(got - want).max() < REL_TOL * np.abs(want).max()

    prompts = _prompts([19, 41, 7], seed=3)
    expected = [hf_greedy(hf, p, 25) for p in prompts]
    assert jaxllm.generate(model, prompts, max_new_tokens=25) == expected
    engine = Engine(model, max_num_batched_tokens=32)  # prefill chunks cross chunk edges
    assert engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=25)) == expected


def test_chunk_1000_at_max_model_len_4000(tiny_model):
    hf, _, path = tiny_model("scout_chunk1000")
    model = jaxllm.load_model(path, max_model_len=4000, max_num_seqs=2)
    prompt = _prompts([3990], seed=4)[0]  # the last partial chunk: positions 3000..3999
    expected = hf_greedy(hf, prompt, 10)
    engine = Engine(model)
    assert engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10)) == [
        expected]
    assert engine.pages.num_free == engine.pages.num_pages
    assert jaxllm.generate(model, [prompt], max_new_tokens=10) == [expected]


def test_pallas_kernel_over_the_hybrid_cache(tiny_model):
    """The engine with the Pallas kernel (interpret mode off GPU): chunk 20 over 16-token
    pages, chunked groups reading tables whose dropped entries are the null page."""
    hf, _, path = tiny_model("scout_chunk20")
    model = jaxllm.load_model(path, max_model_len=64, max_num_seqs=2, attention_impl="pallas")
    assert model.bucket_policy.cache.hybrid
    prompts = _prompts([45, 30], seed=3)
    engine = Engine(model, max_num_batched_tokens=16, num_pages=40)
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
    assert outs == [hf_greedy(hf, p, 8) for p in prompts]
