"""Continuous batching: chunked prefill, preemption, prefix caching, all equal to HF greedy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxllm
from jaxllm import ContextLengthError, SamplingParams
from jaxllm.engine import Engine
from tests.support.compiles import count_compilations

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)

GREEDY_20 = SamplingParams(temperature=0.0, max_tokens=20)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 333, n).tolist() for n in lengths]


def hf_greedy(hf, prompt, n):
    hf.generation_config.eos_token_id = 2
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          eos_token_id=2, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def scout(tiny_model):
    hf, _, path = tiny_model("scout")
    return hf, jaxllm.load_model(path, max_model_len=80, page_size=8, max_num_seqs=4)


@pytest.mark.parametrize("hybrid, num_pages", [(False, 20), (True, 31)])
def test_chunked_prefill_and_preemption_match_hf(tiny_model, hybrid, num_pages):
    """Six requests, four slots, a 32-token step budget and too few pages for all (with the
    hybrid cache: pages for one full-length sequence, 31, are too few only without it)."""
    hf, _, path = tiny_model("scout")
    model = jaxllm.load_model(path, max_model_len=80, page_size=8, max_num_seqs=4,
                              hybrid_kv_cache=hybrid)
    engine = Engine(model, num_pages=num_pages, max_num_batched_tokens=32)
    prompts = _prompts([5, 20, 37, 50, 12, 33])
    outs = engine.generate(prompts, GREEDY_20)
    assert outs == [hf_greedy(hf, p, 20) for p in prompts]
    if not hybrid:
        assert engine.scheduler.num_preemptions > 0
    assert engine.pages.num_free == num_pages  # every page came back


def test_requests_arriving_while_others_decode(scout):
    hf, model = scout
    engine = Engine(model, max_num_batched_tokens=16)
    prompts = _prompts([30, 9, 41], seed=1)
    produced = {engine.add_request(prompts[0], GREEDY_20): []}
    arrivals = {3: prompts[1], 7: prompts[2]}
    step = 0
    while engine.has_unfinished() or arrivals:
        if step in arrivals:
            produced[engine.add_request(arrivals.pop(step), GREEDY_20)] = []
        for out in engine.step():
            produced[out.request_id] += out.new_token_ids
        step += 1
    assert list(produced.values()) == [hf_greedy(hf, p, 20) for p in prompts]


def test_prefix_cache_reuses_full_pages(scout):
    hf, model = scout
    engine = Engine(model)
    shared = _prompts([40], seed=2)[0]
    a, b = shared + [5, 6, 7], shared + [8, 9]
    [out_a] = engine.generate([a], GREEDY_20)
    rid = engine.add_request(b, GREEDY_20)
    produced, cached = [], None
    while engine.has_unfinished():
        for out in engine.step():
            produced += out.new_token_ids
            cached = out.num_cached_tokens
    assert cached == 40  # five full 8-token pages of the shared prefix
    assert rid and out_a == hf_greedy(hf, a, 20) and produced == hf_greedy(hf, b, 20)


def test_seeded_sampling_does_not_depend_on_the_batch(scout):
    _, model = scout
    hot = SamplingParams(temperature=1.0, seed=7, max_tokens=12)
    alone = Engine(model).generate(_prompts([10], seed=3), hot)[0]
    crowd = Engine(model).generate(_prompts([10], seed=3) + _prompts([25, 4], seed=4), hot)
    assert crowd[0] == alone


def test_bad_requests_are_refused_before_running(scout):
    _, model = scout
    engine = Engine(model)
    with pytest.raises(ValueError, match="Token id 333 is out of vocabulary"):
        engine.add_request([1, 333])
    with pytest.raises(ContextLengthError, match="you requested 81 tokens"):
        engine.add_request(list(range(3, 73)), SamplingParams(max_tokens=11))
    engine.add_request([1, 2], request_id="x")
    with pytest.raises(ValueError, match="'x' is already in use"):
        engine.add_request([1, 2], request_id="x")
    assert not engine.scheduler.running


def test_abort_returns_pages(scout):
    _, model = scout
    engine = Engine(model, num_pages=40)
    rid = engine.add_request(_prompts([30])[0], GREEDY_20)
    engine.step()
    assert engine.pages.num_free < 40
    engine.abort(rid)
    assert engine.pages.num_free == 40 and not engine.has_unfinished()


def test_no_compilation_after_warmup(scout):
    _, model = scout
    engine = Engine(model, max_num_batched_tokens=32)
    assert engine.warmup(progress=False) == 2 * 3  # token buckets 16, 32 x batch 1, 2, 4
    with count_compilations() as compiles:
        engine.generate(_prompts([5, 20, 37, 50, 12, 33], seed=9),
                        SamplingParams(temperature=0.5, max_tokens=12, seed=1))
    assert compiles == []


def test_every_layer_reads_the_one_page_size(scout, monkeypatch):
    """Pages of 8 tokens (the default is 16): the cache, the allocator, the step builder and
    the attention call all see 8, because all of them read the engine's one configuration."""
    from jaxllm.model import attention

    hf, model = scout
    assert model.bucket_policy.page_size == 8 != jaxllm.CacheConfig().page_size
    seen = []
    real = attention._IMPLS[model.attention_impl]

    def spy(q, k_pages, v_pages, meta, *, chunk_size, mesh):
        seen.append((k_pages.shape, meta.block_tables.shape[1]))
        return real(q, k_pages, v_pages, meta, chunk_size=chunk_size, mesh=mesh)

    monkeypatch.setitem(attention._IMPLS, model.attention_impl, spy)
    engine = Engine(model, num_pages=40)
    assert engine.policy.cache.page_size == engine.pages.page_size == 8
    assert engine.runner.cache[0][0].shape[:2] == (41, 8)  # 40 pages and the null page
    steps = []
    build = engine.batch.inputs
    prompt = _prompts([21], seed=9)[0]
    request = engine.prepare(prompt, GREEDY_20)
    monkeypatch.setattr(engine.batch, "inputs", lambda plan, *masks: (
        steps.append(([[list(row) for row in request.pages]], build(plan, *masks)))
        or steps[-1][1]))
    engine.submit(request)
    out = engine.step()[0].new_token_ids  # the whole prompt in one step: 3 pages of 8
    (rows,), step = steps[0]
    for group, row in enumerate(rows):
        pages = np.asarray(row)
        assert len(pages) == 3
        np.testing.assert_array_equal(step.meta.slot_mapping[group, :21],
                                      pages[np.arange(21) // 8] * 8 + np.arange(21) % 8)
    assert set(seen) == {((41, 8, 2, 16), 10)}  # table: ceil(80 / 8) pages
    while engine.has_unfinished():
        out += engine.step()[0].new_token_ids
    assert engine.pages.num_free == 40
    assert out == hf_greedy(hf, prompt, 20)


def _run_counting(engine, prompts, sampling):
    """Runs to completion; returns (outputs, most requests sampling in one step)."""
    ids = [engine.add_request(p, sampling) for p in prompts]
    produced, widest = {i: [] for i in ids}, 0
    while engine.has_unfinished():
        outs = engine.step()
        widest = max(widest, len(outs))
        for out in outs:
            produced[out.request_id] += out.new_token_ids
    return [produced[i] for i in ids], widest


def test_hybrid_cache_runs_four_long_requests_where_two_would_fit(tiny_model):
    """A budget of two 256-token sequences on every layer. Four requests of 7/8 of
    max_model_len (chunk 16) decode together with the hybrid cache, with no preemption;
    without it the same bytes hold two at a time."""
    hf, _, path = tiny_model("scout")
    prompts = _prompts([184] * 4, seed=11)
    sampling = SamplingParams(temperature=0.0, max_tokens=40)
    expected = [hf_greedy(hf, p, 40) for p in prompts]
    widest = {}
    for hybrid in (True, False):
        model = jaxllm.load_model(path, max_model_len=256, max_num_seqs=4,
                                  hybrid_kv_cache=hybrid)
        config, cache = model.config, model.bucket_policy.cache
        budget = 2 * 256 * config.num_layers * cache.bytes_per_token(config)
        engine = Engine(model, kv_cache_memory_bytes=budget, max_num_batched_tokens=32)
        outs, widest[hybrid] = _run_counting(engine, prompts, sampling)
        assert outs == expected
        assert engine.pages.num_free == engine.pages.num_pages
        if hybrid:
            assert engine.scheduler.num_preemptions == 0
    assert widest == {True: 4, False: 2}


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_prompt_logprobs_equal_hf(scout, max_tokens):
    """Each prompt token's log-probability given the tokens before it (HF's log-softmax at
    the previous position), across prefill chunks of 16 rows and two requests in a step;
    max_tokens=0 scores the prompt and generates nothing."""
    hf, model = scout
    engine = Engine(model, max_num_batched_tokens=16)
    prompts = _prompts([30, 7], seed=21)
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens, prompt_logprobs=3)
    ids = [engine.add_request(p, sampling) for p in prompts]
    first = {}
    while engine.has_unfinished():
        for out in engine.step():
            first.setdefault(out.request_id, out)
    for rid, prompt in zip(ids, prompts, strict=True):
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([prompt])).logits[0].double()
        want = torch.log_softmax(logits, -1)
        scores = first[rid].prompt_logprobs
        assert [s.token_id for s in scores] == prompt[1:]
        for j, s in enumerate(scores, start=1):
            assert abs(s.logprob - float(want[j - 1, prompt[j]])) < 1e-4
            best = torch.topk(want[j - 1], 3)
            assert [t for t, _ in s.top[:3]] == best.indices.tolist()
        assert first[rid].num_output_tokens == min(max_tokens, 1)
        assert len(first[rid].new_token_ids) == min(max_tokens, 1)
    assert engine.pages.num_free == engine.pages.num_pages
