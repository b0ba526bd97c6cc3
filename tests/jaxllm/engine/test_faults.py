"""A failed step stops only its own requests; the engine recovers and the rest equal HF greedy."""

from __future__ import annotations

import jax
import pytest

import jaxllm
from jaxllm import SamplingParams
from jaxllm.engine import Engine, RecoveryFailed, StepFailed
from jaxllm.engine.faults import Fault, FaultInjector
from tests.jaxllm.engine.test_engine import _prompts, hf_greedy

GREEDY_8 = SamplingParams(temperature=0.0, max_tokens=8)
NUM_PAGES = 64  # room for two sequences of max_model_len in every layer group


@pytest.fixture(scope="module")
def setup(tiny_model):
    """One engine for the module (two step programs: 16 rows x 1 or 2 sequences), and HF's
    greedy continuations, computed once."""
    hf, _, path = tiny_model("scout")
    model = jaxllm.load_model(path, max_model_len=80, page_size=8, max_num_seqs=2)
    engine = Engine(model, num_pages=NUM_PAGES, max_num_batched_tokens=16)
    prompts = _prompts([5, 12, 20, 9, 14], seed=11)
    return engine, prompts, [hf_greedy(hf, p, 8) for p in prompts]


def _run(engine: Engine, ids: list[str]) -> tuple[dict[str, list[int]], list[str]]:
    """Steps until idle; returns each request's tokens and the ids of failed requests."""
    produced: dict[str, list[int]] = {i: [] for i in ids}
    failed: list[str] = []
    while engine.has_unfinished():
        try:
            outputs = engine.step()
        except StepFailed as e:
            failed += e.request_ids
            continue
        for out in outputs:
            produced[out.request_id] += out.new_token_ids
    return produced, failed


def _assert_clean(engine: Engine) -> None:
    assert engine.pages.num_free == NUM_PAGES and not engine.requests
    assert all(not a.is_deleted() for a in jax.tree.leaves(engine.runner.cache))


@pytest.mark.heavy
@pytest.mark.parametrize("fault", list(Fault))
def test_a_failed_step_fails_only_its_requests(setup, fault):
    """Four requests, two slots: step 3 decodes the first two and fails; they get an error,
    the two waiting ones and a later one complete as HF greedy, every page comes back."""
    engine, prompts, want = setup
    ids = [engine.add_request(p, GREEDY_8) for p in prompts[:4]]
    with FaultInjector(engine.runner, fault, steps={3}):
        produced, failed = _run(engine, ids)
    assert failed == ids[:2]
    for i in (2, 3):
        assert produced[ids[i]] == want[i]
    _assert_clean(engine)
    assert engine.generate([prompts[4]], GREEDY_8) == [want[4]]
    _assert_clean(engine)


def test_recovery_recomputes_running_requests(setup):
    """Recovering while two requests decode (their cache lost): both are requeued with no
    pages, the prefix cache is emptied, and both still finish as HF greedy."""
    engine, prompts, want = setup
    ids = [engine.add_request(p, GREEDY_8) for p in prompts[1:3]]
    produced = {i: [] for i in ids}
    for _ in range(4):
        for out in engine.step():
            produced[out.request_id] += out.new_token_ids
    old_cache = jax.tree.leaves(engine.runner.cache)
    assert engine.pages.by_hash and len(engine.scheduler.running) == 2
    assert engine.recover() == 2
    assert all(a.is_deleted() for a in old_cache)
    assert not engine.pages.by_hash and engine.pages.num_free == NUM_PAGES
    assert [r.request_id for r in engine.scheduler.waiting] == ids
    assert all(not r.pages and r.num_computed == 0 for r in engine.scheduler.waiting)
    rest, failed = _run(engine, ids)
    assert not failed
    assert [produced[i] + rest[i] for i in ids] == want[1:3]
    _assert_clean(engine)


def test_failed_recovery_is_reported(setup):
    engine, prompts, _ = setup
    rid = engine.add_request(prompts[0], GREEDY_8)
    with FaultInjector(engine.runner, Fault.BEFORE_DISPATCH, steps={1}, fail_recovery=True):
        with pytest.raises(RecoveryFailed, match="cannot re-create the KV cache"):
            engine.step()
    assert rid not in engine.requests
    engine.recover()  # the injector is gone: recovery works again
    _assert_clean(engine)
