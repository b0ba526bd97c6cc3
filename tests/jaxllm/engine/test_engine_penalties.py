"""Presence, frequency and repetition penalties through the engine, equal to HF transformers
stepped token by token with the penalties applied in numpy from vLLM's definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxllm
from jaxllm import SamplingParams
from jaxllm.engine import Engine
from jaxllm.sharding import make_mesh
from tests.support.compiles import count_compilations

from .test_engine import _prompts, hf_greedy

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)

EOS = 2


def penalised(logits, prompt, output, presence, frequency, repetition):
    """vLLM's penalties, from the definition: every token of the prompt or the output has a
    positive logit divided by ``repetition`` (a negative one multiplied); then each token
    loses ``frequency`` per occurrence in the output and ``presence`` once if it occurs."""
    out = np.array(logits, np.float64)
    for t in set(prompt) | set(output):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in set(output):
        n = output.count(t)
        out[t] -= frequency * n + presence
    return out


def hf_penalised_greedy(hf, prompt, n, sampling):
    """HF's greedy continuation with the penalties, one full forward per token."""
    output: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = hf(input_ids=torch.tensor([prompt + output])).logits[0, -1].double()
            token = int(np.argmax(penalised(
                logits.numpy(), prompt, output, sampling.presence_penalty,
                sampling.frequency_penalty, sampling.repetition_penalty)))
            output.append(token)
            if token == EOS:
                break
    return output


REPETITION = SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=1.8)
FREQUENCY = SamplingParams(temperature=0.0, max_tokens=16, frequency_penalty=1.5)
PRESENCE = SamplingParams(temperature=0.0, max_tokens=16, presence_penalty=2.0)
ALL = SamplingParams(temperature=0.0, max_tokens=16, presence_penalty=-0.5,
                     frequency_penalty=0.8, repetition_penalty=0.7)
PLAIN = SamplingParams(temperature=0.0, max_tokens=16)


def _run(engine, requests):
    ids = [engine.add_request(p, s) for p, s in requests]
    produced = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            produced[out.request_id] += out.new_token_ids
    return [produced[i] for i in ids]


@pytest.fixture(scope="module")
def scout(tiny_model):
    hf, _, path = tiny_model("scout")
    return hf, path


def test_penalties_mixed_with_plain_requests_and_chunked_prefill_match_hf(scout):
    """Each penalty alone and all three together, beside unpenalised requests in the same
    steps (which must not change), with prompts longer than the 16-row step (chunked)."""
    hf, path = scout
    model = jaxllm.load_model(path, max_model_len=80, page_size=8, max_num_seqs=8)
    engine = Engine(model, max_num_batched_tokens=16)
    prompts = _prompts([37, 9, 21, 5, 12, 30], seed=31)
    requests = list(zip(prompts, [REPETITION, PLAIN, FREQUENCY, PRESENCE, PLAIN, ALL],
                        strict=True))
    outs = _run(engine, requests)
    for (prompt, sampling), out in zip(requests, outs, strict=True):
        if sampling is PLAIN:
            assert out == hf_greedy(hf, prompt, 16)
        else:
            assert out == hf_penalised_greedy(hf, prompt, 16, sampling)
    # The penalties changed something: otherwise this test would show nothing.
    changed = [out != hf_greedy(hf, p, 16) for (p, s), out in zip(requests, outs, strict=True)
               if s is not PLAIN]
    assert sum(changed) >= 3, changed
    assert engine.pages.num_free == engine.pages.num_pages
    assert sorted(engine.scheduler.free_rows) == list(range(8))


def test_penalties_survive_preemption_and_recompute(scout):
    """Too few pages for all: preempted requests are recomputed from prompt + outputs, and
    their re-fed outputs count again as output tokens (from a reset slot)."""
    hf, path = scout
    model = jaxllm.load_model(path, max_model_len=80, page_size=8, max_num_seqs=4,
                              hybrid_kv_cache=False)
    engine = Engine(model, num_pages=20, max_num_batched_tokens=32)
    prompts = _prompts([5, 20, 37, 50, 12, 33], seed=32)
    samplings = [FREQUENCY, ALL, REPETITION, PLAIN, PRESENCE, FREQUENCY]
    outs = _run(engine, list(zip(prompts, samplings, strict=True)))
    assert engine.scheduler.num_preemptions > 0
    for prompt, sampling, out in zip(prompts, samplings, outs, strict=True):
        assert out == hf_penalised_greedy(hf, prompt, 16, sampling)
    assert engine.pages.num_free == 20


def test_penalties_skip_the_prefix_cache_and_recover_after_a_reset(scout):
    """A penalised request computes its whole prompt (prompt tokens count for the
    repetition penalty) even when its prefix is cached; after ``recover`` (the penalty
    state re-created with the KV cache) the requeued request still matches."""
    hf, path = scout
    model = jaxllm.load_model(path, max_model_len=80, page_size=8, max_num_seqs=4)
    engine = Engine(model)
    prompt = _prompts([40], seed=33)[0]
    _run(engine, [(prompt, PLAIN)])  # its pages are in the prefix cache now
    rid = engine.add_request(prompt, REPETITION)
    first = engine.step()
    assert first[0].num_cached_tokens == 0
    produced = first[0].new_token_ids + engine.step()[0].new_token_ids
    engine.recover()  # as after a failed step: prompt and both outputs are recomputed
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid
            produced += out.new_token_ids
    assert produced == hf_penalised_greedy(hf, prompt, 16, REPETITION)


def test_penalties_with_the_vocabulary_split_over_8_devices(scout):
    hf, path = scout
    model = jaxllm.load_model(path, max_model_len=80, page_size=8, max_num_seqs=4,
                              mesh=make_mesh(model=8))
    assert model.params["embed"].shape[0] == 336  # 333 padded to a multiple of 8
    engine = Engine(model, max_num_batched_tokens=16)
    prompts = _prompts([23, 6], seed=34)
    requests = [(prompts[0], ALL), (prompts[1], PLAIN)]
    outs = _run(engine, requests)
    assert outs[0] == hf_penalised_greedy(hf, prompts[0], 16, ALL)
    assert outs[1] == hf_greedy(hf, prompts[1], 16)


def test_generate_refuses_penalties(scout):
    _, path = scout
    model = jaxllm.load_model(path, max_model_len=80, page_size=8)
    with pytest.raises(ValueError, match="generate\\(\\) does not apply presence_penalty"):
        jaxllm.generate(model, [[5, 6]], max_new_tokens=2, sampling=FREQUENCY)


def test_penalised_requests_compile_nothing_after_warmup(scout):
    """The penalties run inside the one step program: no program of their own."""
    _, path = scout
    model = jaxllm.load_model(path, max_model_len=80, page_size=8, max_num_seqs=2)
    engine = Engine(model, max_num_batched_tokens=16)
    engine.warmup(progress=False)
    with count_compilations() as compiles:
        _run(engine, list(zip(_prompts([21, 4], seed=35), [ALL, PLAIN], strict=True)))
    assert compiles == []
