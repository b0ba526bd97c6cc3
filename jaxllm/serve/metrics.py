"""Prometheus metrics of the server (names follow the CUDA engine's, prefixed jaxllm:)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from jaxllm.engine import Engine, RequestOutput

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        label = {"model_name": model_name}
        r, names = self.registry, ["model_name"]
        self.requests = Counter("jaxllm:request_success", "Finished requests",
                                names + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("jaxllm:prompt_tokens", "Prefilled prompt tokens",
                                     names, registry=r).labels(**label)
        self.generation_tokens = Counter("jaxllm:generation_tokens", "Generated tokens",
                                         names, registry=r).labels(**label)
        self.running = Gauge("jaxllm:num_requests_running", "Requests running", names,
                             registry=r).labels(**label)
        self.waiting = Gauge("jaxllm:num_requests_waiting", "Requests waiting", names,
                             registry=r).labels(**label)
        self.cache_usage = Gauge("jaxllm:kv_cache_usage_perc", "Fraction of KV pages in use",
                                 names, registry=r).labels(**label)
        self.ttft = Histogram("jaxllm:time_to_first_token_seconds", "Time to first token",
                              names, buckets=_LATENCY, registry=r).labels(**label)
        self.e2e = Histogram("jaxllm:e2e_request_latency_seconds", "Request latency", names,
                             buckets=_LATENCY, registry=r).labels(**label)
        self.step_failures = Counter("jaxllm:engine_step_failures",
                                     "Engine steps that failed (their requests got an error)",
                                     names, registry=r).labels(**label)
        self.step_time = Histogram("jaxllm:engine_step_seconds", "Engine step time", names,
                                   buckets=_LATENCY, registry=r).labels(**label)
        self.preemptions = Counter("jaxllm:num_preemptions", "Requests preempted (recomputed "
                                   "later) for want of KV pages", names,
                                   registry=r).labels(**label)
        self.group_usage = Gauge("jaxllm:kv_cache_group_usage_perc", "Fraction of the KV "
                                 "page pool held by each layer group", names + ["group"],
                                 registry=r)
        self._label = label
        self._preempted = 0

    def on_step(self, engine: Engine, outputs: list[RequestOutput], seconds: float) -> None:
        self.step_time.observe(seconds)
        self.refresh(engine)
        self.generation_tokens.inc(sum(len(o.new_token_ids) for o in outputs))

    def refresh(self, engine) -> None:
        """Sets the gauges from the engine's state: after a step, and after an abort or a
        failed step frees pages (the gauges must not wait for the next step)."""
        self.running.set(len(engine.scheduler.running))
        self.waiting.set(len(engine.scheduler.waiting))
        pages = engine.pages
        self.cache_usage.set(1.0 - pages.num_free / pages.num_pages)
        self.preemptions.inc(engine.scheduler.num_preemptions - self._preempted)
        self._preempted = engine.scheduler.num_preemptions
        for group, held in enumerate(engine.scheduler.pages_held_by_group()):
            kind = "global" if pages.group_chunk[group] is None else "chunked"
            self.group_usage.labels(group=f"{group}-{kind}", **self._label).set(
                held / pages.num_pages)

    def on_step_failure(self) -> None:
        self.step_failures.inc()

    def on_finish(self, reason: str, prompt_tokens: int, ttft: float | None,
                  e2e: float) -> None:
        self.requests.labels(finished_reason=reason, **self._label).inc()
        self.prompt_tokens.inc(prompt_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        self.e2e.observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)
