"""The engine thread behind asyncio handlers, over a fake engine (no model): per-request
delivery, abort on early exit, failing steps, rejected submissions, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from jaxllm.engine import RecoveryFailed, StepFailed
from jaxllm.engine.engine import RequestOutput
from jaxllm.engine.request import Request
from jaxllm.sample.sampling import SamplingParams
from jaxllm.serve.async_engine import AsyncEngine, EngineDead, EngineError

WAIT = 10  # seconds before a test that would hang fails instead


class FakeEngine:
    """Each request yields tokens ``prompt[0] + 0, + 1, ...``, one per step, until it has
    ``max_tokens``. Step number ``fail_at`` fails as ``Engine.step`` does: it stops the
    step's requests and raises StepFailed, or RecoveryFailed when ``recovers`` is False. With
    ``gated``, every step first waits for a permit on ``gate``."""

    def __init__(self, fail_at: int | None = None, gated: bool = False, recovers: bool = True):
        self.scheduler = SimpleNamespace(running=[], waiting=[])
        self.requests: dict[str, Request] = {}
        self.aborted: list[str] = []
        self.abort_seen = threading.Event()
        self.fail_at, self.steps, self.recovers = fail_at, 0, recovers
        self.gate = threading.Semaphore(0) if gated else None
        self.executor = SimpleNamespace(on_failure=None, stop=lambda: None)

    def submit(self, request: Request) -> str:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.prompt[0] < 0:
            raise ValueError("bad prompt")
        self.requests[request.request_id] = request
        self.scheduler.waiting.append(request)
        return request.request_id

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        request = self.requests.pop(request_id, None)
        for queue in (self.scheduler.running, self.scheduler.waiting):
            if request in queue:
                queue.remove(request)
        self.abort_seen.set()

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    def step(self) -> list[RequestOutput]:
        if self.gate is not None and not self.gate.acquire(timeout=WAIT):
            raise RuntimeError("test gate never opened")
        self.steps += 1
        if self.steps == self.fail_at:
            if not self.recovers:
                raise RecoveryFailed("cannot re-create the KV cache (boom)")
            failed = [r.request_id for r in self.scheduler.running + self.scheduler.waiting]
            for rid in failed:
                del self.requests[rid]
            self.scheduler.running, self.scheduler.waiting = [], []
            raise StepFailed(failed, RuntimeError("boom"))
        self.scheduler.running += self.scheduler.waiting
        self.scheduler.waiting.clear()
        outputs = []
        for r in list(self.scheduler.running):
            r.output.append(r.prompt[0] + len(r.output))
            done = len(r.output) >= r.max_tokens
            if done:
                self.scheduler.running.remove(r)
                del self.requests[r.request_id]
            outputs.append(RequestOutput(r.request_id, [r.output[-1]], [], done,
                                         "length" if done else None, 1, 0, len(r.output)))
        return outputs


def _request(rid: str, first: int, max_tokens: int) -> Request:
    return Request(rid, [first], SamplingParams(max_tokens=max_tokens, seed=0))


@pytest.fixture
def make_async():
    made = []

    def make(engine: FakeEngine, metrics=None) -> AsyncEngine:
        made.append(AsyncEngine(engine, metrics))
        return made[-1]

    yield make
    for a in made:
        a.shutdown()


async def _collect(agen, limit: int | None = None) -> list[RequestOutput]:
    out = []
    while limit is None or len(out) < limit:
        try:
            out.append(await asyncio.wait_for(anext(agen), WAIT))
        except StopAsyncIteration:
            break
    return out


def _tokens(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def test_outputs_reach_their_own_request_in_order(make_async):
    engine = FakeEngine()
    async_engine = make_async(engine)

    async def main():
        return await asyncio.gather(
            _collect(async_engine.generate(_request("a", 100, 3))),
            _collect(async_engine.generate(_request("b", 200, 5))))

    a, b = asyncio.run(main())
    assert _tokens(a) == [100, 101, 102] and _tokens(b) == [200, 201, 202, 203, 204]
    assert [o.finished for o in a] == [False, False, True]
    assert {o.request_id for o in a} == {"a"} and {o.request_id for o in b} == {"b"}
    assert engine.aborted == []


def test_leaving_early_aborts_only_that_request(make_async):
    engine = FakeEngine()
    async_engine = make_async(engine)

    async def main():
        done = await _collect(async_engine.generate(_request("done", 0, 2)))
        early = async_engine.generate(_request("early", 0, 1000))
        first = await _collect(early, limit=1)
        await early.aclose()  # a client that disconnects
        seen = await asyncio.to_thread(engine.abort_seen.wait, WAIT)
        return done, first, seen

    done, first, seen = asyncio.run(main())
    assert len(done) == 2 and done[-1].finished and len(first) == 1 and seen
    # The inbox is in order: a finished request would have been aborted before this one.
    assert engine.aborted == ["early"]


@pytest.mark.parametrize("fail_at, outputs_before", [(1, 0), (2, 1)])
def test_a_failing_step_fails_its_requests_and_serving_goes_on(make_async, fail_at,
                                                               outputs_before):
    engine = FakeEngine(fail_at=fail_at)
    async_engine = make_async(engine)
    got: list[RequestOutput] = []

    async def main():
        with pytest.raises(EngineError, match=r"engine step failed \(RuntimeError: boom\)") as e:
            async for out in async_engine.generate(_request("x", 0, 5)):
                got.append(out)
        assert e.value.status == 500
        return await _collect(async_engine.generate(_request("y", 50, 2)))

    later = asyncio.run(main())
    assert len(got) == outputs_before
    assert "x" not in engine.requests
    assert async_engine.unhealthy is None and _tokens(later) == [50, 51]


def test_a_failed_recovery_fails_every_request_with_503(make_async):
    engine = FakeEngine(fail_at=2, gated=True, recovers=False)
    async_engine = make_async(engine)

    async def main():
        a = async_engine.generate(_request("a", 0, 5))
        engine.gate.release()
        await _collect(a, limit=1)  # the engine now waits in its second step
        b = asyncio.ensure_future(_collect(async_engine.generate(_request("b", 9, 5))))
        await asyncio.sleep(0.1)  # b waits in the inbox
        engine.gate.release()
        errors = []
        for waiting in (_collect(a), b, _collect(async_engine.generate(_request("c", 0, 1)))):
            with pytest.raises(EngineDead, match="cannot re-create the KV cache") as e:
                await asyncio.wait_for(waiting, WAIT)
            errors.append(e.value.status)
        return errors

    assert asyncio.run(main()) == [503, 503, 503]
    assert "cannot re-create the KV cache" in async_engine.unhealthy


def test_a_rejected_submission_raises_in_the_caller(make_async):
    async_engine = make_async(FakeEngine())

    async def main():
        with pytest.raises(ValueError, match="bad prompt"):
            await _collect(async_engine.generate(_request("bad", -1, 3)))
        return await _collect(async_engine.generate(_request("good", 7, 1)))

    assert _tokens(asyncio.run(main())) == [7]


def test_metrics_see_every_step_and_output(make_async):
    steps = []
    metrics = SimpleNamespace(on_step=lambda engine, outputs, seconds: steps.append(
        [o.request_id for o in outputs]))
    async_engine = make_async(FakeEngine(), metrics)
    asyncio.run(_collect(async_engine.generate(_request("m", 0, 3))))
    assert steps == [["m"], ["m"], ["m"]]


def test_after_shutdown_generate_raises_engine_dead(make_async):
    async_engine = make_async(FakeEngine())
    async_engine.shutdown()
    assert not async_engine.alive
    with pytest.raises(EngineDead):
        asyncio.run(_collect(async_engine.generate(_request("late", 0, 1))))



def test_a_request_id_already_streaming_is_refused_without_touching_the_first(make_async):
    engine = FakeEngine(gated=True)
    async_engine = make_async(engine)

    async def main():
        first = async_engine.generate(_request("same", 10, 2))
        engine.gate.release()
        head = await _collect(first, limit=1)  # the engine now waits in its second step
        with pytest.raises(ValueError, match="already in use"):
            await _collect(async_engine.generate(_request("same", 90, 2)))
        engine.gate.release()
        return head + await _collect(first)

    outputs = asyncio.run(main())
    assert _tokens(outputs) == [10, 11] and outputs[-1].finished
    assert engine.aborted == []


def test_gauges_are_refreshed_after_an_abort_without_waiting_for_a_step(make_async):
    engine = FakeEngine(gated=True)
    running_at_refresh = []
    metrics = SimpleNamespace(on_step=lambda *_: None, refresh=lambda e: running_at_refresh
                              .append(len(e.scheduler.running) + len(e.scheduler.waiting)))
    async_engine = make_async(engine, metrics)

    async def main():
        engine.gate.release()
        early = async_engine.generate(_request("early", 0, 1000))
        await _collect(early, limit=1)
        await early.aclose()
        engine.gate.release()  # ends the step under way; then the abort is handled
        return await asyncio.to_thread(engine.abort_seen.wait, WAIT)

    assert asyncio.run(main())
    deadline = time.monotonic() + WAIT
    while not running_at_refresh and time.monotonic() < deadline:
        time.sleep(0.01)
    assert running_at_refresh[-1:] == [0]  # refreshed once the request was gone
