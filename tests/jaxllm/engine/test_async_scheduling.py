"""Async scheduling changes when the host works, never what comes out: the same tokens, stop
reasons, log-probabilities and prompt scores with it on and off, for every kind of request,
under memory pressure, with aborts and failed steps; greedy ones equal HF's."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer

import jaxllm
from jaxllm import SamplingParams
from jaxllm.engine import Engine, StepFailed
from jaxllm.engine.faults import Fault, FaultInjector
from jaxllm.sample.grammar import GrammarCompiler, StructuredOutput
from tests.jaxllm.engine.test_engine import _prompts, hf_greedy
from tests.jaxllm.engine.test_engine_penalties import hf_penalised_greedy

pytestmark = pytest.mark.heavy  # end to end: compiles engines or models (tests/conftest.py)


@pytest.fixture(scope="module")
def scout(tiny_model):
    hf, _, path = tiny_model("scout")
    return hf, jaxllm.load_model(path, max_model_len=80, page_size=8, max_num_seqs=8)


@pytest.fixture(scope="module")
def scout_whole_cache(tiny_model):
    """Without the hybrid cache: every layer keeps its whole history, so few pages preempt."""
    hf, _, path = tiny_model("scout")
    return hf, jaxllm.load_model(path, max_model_len=80, page_size=8, max_num_seqs=8,
                                 hybrid_kv_cache=False)


MIXED = [
    SamplingParams(temperature=0.0, max_tokens=20),  # greedy
    SamplingParams(temperature=0.9, top_k=20, seed=11, max_tokens=14),
    SamplingParams(temperature=1.2, top_p=0.8, seed=12, max_tokens=17),
    SamplingParams(temperature=0.7, min_p=0.05, seed=13, max_tokens=9),
    SamplingParams(temperature=1.0, seed=2**40 + 5, max_tokens=12, min_tokens=6,
                   stop_token_ids=(7, 9, 11)),
    SamplingParams(temperature=0.0, max_tokens=15, logit_bias=((17, 4.0), (5, -100.0))),
    SamplingParams(temperature=0.0, max_tokens=16, presence_penalty=0.6,
                   frequency_penalty=0.4, repetition_penalty=1.3),
    SamplingParams(temperature=0.8, seed=14, max_tokens=10, prompt_logprobs=3),
]


def _run(engine: Engine, requests, *, abort_at: dict[int, str] | None = None,
         arrivals: dict[int, list] | None = None):
    """Runs (prompt, sampling) requests; returns per request id everything it received:
    tokens, (token, logprob) pairs, finish reason, stop token, prompt scores."""
    got: dict[str, dict] = {}

    def add(batch):
        for prompt, sampling in batch:
            rid = engine.submit(engine.prepare(prompt, sampling, ignore_eos=False))
            got[rid] = {"tokens": [], "logprobs": [], "finish": None, "stop": None,
                        "prompt": None}

    add(requests)
    step = 0
    while engine.has_unfinished() or arrivals:
        if arrivals and step in arrivals:
            add(arrivals.pop(step))
        if abort_at and step in abort_at:
            engine.abort(abort_at.pop(step))
        for out in engine.step():
            entry = got[out.request_id]
            assert entry["finish"] is None, f"{out.request_id} got an output after it ended"
            entry["tokens"] += out.new_token_ids
            entry["logprobs"] += [(lp.token_id, round(lp.logprob, 5)) for lp in out.logprobs]
            if out.finished:
                entry["finish"], entry["stop"] = out.finish_reason, out.stop_token
            if out.prompt_logprobs is not None:
                entry["prompt"] = [(p.token_id, round(p.logprob, 5)) for p in out.prompt_logprobs]
        step += 1
    assert engine.pages.num_free == engine.pages.num_pages
    return got


def _both(model, requests, **engine_args):
    """``_run`` on an engine without async scheduling, then on one with it."""
    return [_run(Engine(model, async_scheduling=mode, **engine_args), requests)
            for mode in (False, True)]


def test_every_kind_of_request_gives_the_same_outputs_on_and_off(scout):
    hf, model = scout
    prompts = _prompts([30, 9, 41, 5, 17, 22, 12, 26], seed=3)
    requests = list(zip(prompts, MIXED, strict=True))
    sync, overlapped = _both(model, requests, max_num_batched_tokens=32)
    assert sync == overlapped
    assert sync["req-0"]["tokens"] == hf_greedy(hf, prompts[0], 20)
    assert sync["req-5"]["tokens"] != hf_greedy(hf, prompts[5], 15)  # the bias acts
    assert sync["req-6"]["tokens"] == hf_penalised_greedy(hf, prompts[6], 16, MIXED[6])
    assert len(sync["req-7"]["prompt"]) == len(prompts[7]) - 1  # every token after the first
    stopped = [r for r in sync.values() if r["stop"] is not None]
    assert all(r["finish"] == "stop" and r["tokens"][-1] == r["stop"] for r in stopped)


def test_memory_pressure_preemption_gives_the_same_outputs(scout_whole_cache):
    hf, model = scout_whole_cache
    prompts = _prompts([37, 50, 12, 33, 20, 44], seed=5)
    greedy = SamplingParams(temperature=0.0, max_tokens=20)
    sampled = SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=20)
    requests = [(p, greedy if i % 2 else sampled) for i, p in enumerate(prompts)]
    runs = []
    for mode in (False, True):
        engine = Engine(model, num_pages=20, max_num_batched_tokens=32, async_scheduling=mode)
        runs.append(_run(engine, requests))
        assert engine.scheduler.num_preemptions > 0
    assert runs[0] == runs[1]
    for i, (p, s) in enumerate(requests):
        if s is greedy:
            assert runs[1][f"req-{i}"]["tokens"] == hf_greedy(hf, p, 20)


def test_arrivals_and_an_abort_mid_stream_give_the_same_outputs(scout):
    hf, model = scout
    prompts = _prompts([30, 9, 41, 14], seed=1)
    greedy = SamplingParams(temperature=0.0, max_tokens=20)
    arrivals = {3: [(prompts[2], greedy)], 7: [(prompts[3], greedy)]}
    runs = []
    for mode in (False, True):
        engine = Engine(model, max_num_batched_tokens=16, async_scheduling=mode)
        runs.append(_run(engine, [(p, greedy) for p in prompts[:2]],
                         abort_at={6: "req-1"}, arrivals=dict(arrivals)))
    assert runs[0] == runs[1]
    assert runs[1]["req-1"]["finish"] is None  # aborted: it never says it finished
    assert 0 < len(runs[1]["req-1"]["tokens"]) < 20
    assert runs[1]["req-1"]["tokens"] == hf_greedy(hf, prompts[1], 20)[:len(
        runs[1]["req-1"]["tokens"])]
    for rid, p in (("req-0", prompts[0]), ("req-2", prompts[2]), ("req-3", prompts[3])):
        assert runs[1][rid]["tokens"] == hf_greedy(hf, p, 20)


@pytest.mark.parametrize("fault", list(Fault))
def test_a_failed_step_fails_the_same_requests_and_the_rest_recover(scout, fault):
    hf, model = scout
    prompts = _prompts([12, 20, 7], seed=8)
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    runs = []
    for mode in (False, True):
        # Step 4 fails: the short prompt has decoded, the longest is still in prefill
        # (8-token steps), so the failed step holds both kinds.
        engine = Engine(model, async_scheduling=mode, max_num_batched_tokens=8)
        ids = [engine.add_request(p, greedy) for p in prompts]
        got = {i: [] for i in ids}
        failed = []
        with FaultInjector(engine.runner, fault, steps={4}):
            while engine.has_unfinished():
                try:
                    for out in engine.step():
                        got[out.request_id] += out.new_token_ids
                except StepFailed as e:
                    failed += e.request_ids
        assert failed, "the injected fault failed no request"
        runs.append((got, sorted(failed)))
        assert engine.pages.num_free == engine.pages.num_pages
    assert runs[0] == runs[1]
    got, failed = runs[1]
    for rid, p in zip(got, prompts, strict=True):
        if rid not in failed:
            assert got[rid] == hf_greedy(hf, p, 12)


def test_structured_outputs_give_the_same_outputs(scout):
    from jaxllm.serve.__main__ import DEFAULT_MODEL

    model = jaxllm.load_model(DEFAULT_MODEL)
    tokenizer = Tokenizer.from_file(str(DEFAULT_MODEL / "tokenizer.json"))
    prompt = tokenizer.encode("<|user|>What is 12 + 34?<|assistant|>").ids
    schema = {"type": "object",
              "properties": {"sum": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["sum"], "additionalProperties": False}
    requests = [
        (prompt, SamplingParams(temperature=0.0, max_tokens=30,
                                structured=StructuredOutput.json_schema(schema, closed=True))),
        (prompt, SamplingParams(temperature=1.0, seed=4, max_tokens=30,
                                structured=StructuredOutput("regex", r"[0-9]{2,4}"))),
        (prompt, SamplingParams(temperature=1.0, seed=5, max_tokens=30)),
    ]
    runs = []
    for mode in (False, True):
        engine = Engine(model, num_pages=64, async_scheduling=mode)
        engine.grammars = GrammarCompiler.for_tokenizer(tokenizer, model.eos_token_ids,
                                                        model.config.vocab_size)
        runs.append(_run(engine, requests))
    assert runs[0] == runs[1]
    import json

    assert runs[1]["req-0"]["finish"] == "stop"
    assert set(json.loads(tokenizer.decode(runs[1]["req-0"]["tokens"]))) == {"sum"}


def test_the_persistent_block_table_is_what_each_pieces_pages_say(scout_whole_cache):
    """Every step's tables gathered from the persistent batch equal those copied from the
    pieces' own pages, through admissions, chunked prefill, preemption and finishes."""
    hf, model = scout_whole_cache
    engine = Engine(model, num_pages=20, max_num_batched_tokens=32)
    step_plan, build, checked, pages = engine._step_plan, engine.batch.inputs, [], []

    def plan(scheduled):
        pages[:] = [[list(row) for row in s.request.pages] for s in scheduled]
        return step_plan(scheduled)

    def both(plan, *masks):
        fast = build(plan, *masks)
        slow = build(dataclasses.replace(plan, pages=list(pages)), *masks)
        for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow), strict=True):
            np.testing.assert_array_equal(a, b)
        checked.append(plan.pages is None)
        return fast

    engine._step_plan, engine.batch.inputs = plan, both
    prompts = _prompts([37, 50, 12, 33, 20, 44], seed=5)
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=20))
    assert engine.scheduler.num_preemptions > 0 and all(checked) and len(checked) > 20
    assert outs == [hf_greedy(hf, p, 20) for p in prompts]
