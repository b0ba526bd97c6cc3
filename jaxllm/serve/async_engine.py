"""The engine on its own thread, fed and read from asyncio handlers.

Only the engine thread touches the engine's state. Handlers ``prepare`` a request (pure
checks, safe from any thread), then submit it through an inbox; outputs come back on a
per-request asyncio queue.

A failing step fails the requests in it (a 500 each), never the server: the engine recovers
and serves the rest. When it cannot (recovery failed, steps keep failing, the thread died) it
says so: ``unhealthy`` gives the reason (``/health`` answers 503) and every waiting and new
request gets a 503, so an orchestrator can restart the server. Across processes, a broken
group (a process died: ``jaxllm.engine.executor``) fails every request with a 503 and the
server exits with status 1.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from jaxllm.engine import Engine, Request, RequestOutput, StepFailed
from jaxllm.sample.sampling import SamplingParams

log = logging.getLogger("jaxllm.serve")


class EngineError(RuntimeError):
    """The engine's answer to a request it could not serve, with its HTTP status and type."""

    status, kind = 500, "InternalServerError"


class EngineDead(EngineError):
    """The engine cannot serve any more."""

    status, kind = 503, "ServiceUnavailableError"


class AsyncEngine:
    """Runs ``engine`` on its own thread; gives up (unhealthy) after
    ``max_consecutive_failures`` failed steps in a row or a failed recovery."""

    def __init__(self, engine: Engine, metrics=None, *, max_consecutive_failures: int = 3):
        self.engine = engine
        self.metrics = metrics
        self.max_consecutive_failures = max_consecutive_failures
        self._consecutive_failures = 0
        self._failure: str | None = None  # why the engine cannot serve, once it cannot
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        engine.executor.on_failure = self._give_up
        self._thread = threading.Thread(target=self._run, name="jaxllm-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stops the engine thread, then any follower processes."""
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            log.error("the engine thread did not stop within 10 s; followers not stopped")
        else:
            self.engine.executor.stop()

    @property
    def max_model_len(self) -> int:
        return self.engine.policy.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size

    def prepare(self, prompt: list[int], sampling: SamplingParams, request_id: str, *,
                ignore_eos: bool = False, images=()) -> Request:
        """One checked engine request (``Engine.prepare``: a ValueError names what is wrong;
        ``images``: the prompt's, in order); the routes submit it with ``generate``."""
        return self.engine.prepare(prompt, sampling, request_id, ignore_eos=ignore_eos,
                                   images=images)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def unhealthy(self) -> str | None:
        """Why the engine cannot serve, or None while it can."""
        if self._failure is not None:
            return self._failure
        return None if self.alive else "the engine thread is not running"

    def check_serving(self) -> None:
        """Raises EngineDead (a 503) when the engine cannot serve."""
        if (reason := self.unhealthy) is not None:
            raise EngineDead(f"the engine cannot serve: {reason}")

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Runs a prepared request; yields its outputs until it finishes. Leaving early
        (a client that disconnects) aborts it."""
        if request.request_id in self._streams:  # its outputs and abort would go astray
            raise ValueError(f"request id {request.request_id!r} is already in use")
        out_queue: asyncio.Queue = asyncio.Queue()
        # Registered before the health check, so a failure after the check reaches it.
        self._streams[request.request_id] = (asyncio.get_running_loop(), out_queue)
        finished = False
        try:
            self.check_serving()
            self._inbox.put(("add", request))
            while True:
                item = await out_queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                self._inbox.put(("abort", request.request_id))

    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items) -> None:
        """Hands ``(request id, output or error)`` pairs to their streams: one wake-up of each
        event loop for them all (a step's outputs, not one cross-thread call per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug in the loop itself must leave no request waiting
            log.exception("the engine loop crashed")
            self._give_up(f"the engine loop crashed ({type(e).__name__}: {e})")

    def _loop(self) -> None:
        engine = self.engine
        while not self._stop.is_set() and self._failure is None:
            block = not engine.has_unfinished()
            try:
                item = self._inbox.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                item = False
            while item not in (False, None):
                self._handle(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = False
            if item is None or not engine.has_unfinished():
                continue
            self._step()

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
        except StepFailed as e:  # the engine stopped the step's requests and recovered
            self._count_failure()
            giving_up = None
            if self._consecutive_failures >= self.max_consecutive_failures:
                giving_up = (f"{self._consecutive_failures} engine steps failed in a row, "
                             f"the last: {e}")
                # Unhealthy before the failed requests hear of it: a client that asks
                # /health on its 500 must see the 503.
                self._failure = self._failure or giving_up
            self._deliver_all([(rid, EngineError(f"{e}; this request was stopped"))
                               for rid in e.request_ids])
            if giving_up is not None:
                self._give_up(giving_up)
            elif self.metrics is not None:
                self.metrics.refresh(self.engine)
            return
        except Exception as e:  # recovery failed: the engine's state is unknown
            self._count_failure()
            log.exception("engine step failed and the engine did not recover")
            self._give_up(f"{type(e).__name__}: {e}")
            return
        self._consecutive_failures = 0
        if self.metrics is not None:
            self.metrics.on_step(self.engine, outputs, time.perf_counter() - start)
        self._deliver_all([(out.request_id, out) for out in outputs])

    def _count_failure(self) -> None:
        self._consecutive_failures += 1
        if self.metrics is not None:
            self.metrics.on_step_failure()

    def _give_up(self, reason: str) -> None:
        """Marks the engine unable to serve and fails every request waiting on it."""
        self._failure = self._failure or reason
        log.error("the engine cannot serve any more (/health answers 503): %s", reason)
        self._deliver_all([(rid, EngineDead(f"the engine cannot serve: {reason}"))
                           for rid in self._streams.copy()])

    def _handle(self, item) -> None:
        kind, payload = item
        if kind == "add":
            try:
                self.engine.submit(payload)
            except ValueError as e:
                self._deliver(payload.request_id, e)
        elif kind == "abort":
            self.engine.abort(payload)
            if self.metrics is not None:
                self.metrics.refresh(self.engine)


def _put_all(batch) -> None:
    for out_queue, item in batch:
        out_queue.put_nowait(item)
