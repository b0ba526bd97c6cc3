"""The engine on its own thread, fed and read from asyncio handlers.

Only the engine thread touches the engine's state. Handlers ``prepare`` a request (pure
checks, safe from any thread), then submit it through an inbox; outputs come back on a
per-request asyncio queue. A failing step fails the requests in it, never the server.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from jaxllm.engine import Engine, Request, RequestOutput

log = logging.getLogger("jaxllm.serve")


class EngineDead(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: Engine, metrics=None):
        self.engine = engine
        self.metrics = metrics
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jaxllm-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Runs a prepared request; yields its outputs until it finishes. Leaving early
        (a client that disconnects) aborts it."""
        if not self.alive:
            raise EngineDead("the engine thread is not running")
        if request.request_id in self._streams:  # its outputs and abort would go astray
            raise ValueError(f"request id {request.request_id!r} is already in use")
        out_queue: asyncio.Queue = asyncio.Queue()
        self._streams[request.request_id] = (asyncio.get_running_loop(), out_queue)
        self._inbox.put(("add", request))
        finished = False
        try:
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
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, out_queue = stream
            loop.call_soon_threadsafe(out_queue.put_nowait, item)

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
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
            running = [r.request_id for r in engine.scheduler.running]
            start = time.perf_counter()
            try:
                outputs = engine.step()
            except Exception as e:  # fail what was running, keep serving
                log.exception("engine step failed")
                for rid in running + [r.request_id for r in engine.scheduler.waiting]:
                    engine.abort(rid)
                    self._deliver(rid, RuntimeError(f"engine step failed: {e}"))
                continue
            if self.metrics is not None:
                self.metrics.on_step(engine, outputs, time.perf_counter() - start)
            for out in outputs:
                self._deliver(out.request_id, out)

    def _handle(self, item) -> None:
        kind, payload = item
        if kind == "add":
            try:
                self.engine.submit(payload)
            except ValueError as e:
                self._deliver(payload.request_id, e)
        elif kind == "abort":
            self.engine.abort(payload)
