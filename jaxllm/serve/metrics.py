"""Prometheus metrics of the server: vLLM's names (``vllm:``), so its dashboards work, and
jaxllm's own (``jaxllm:``) for what vLLM has no name for (step time and failures, per-group
KV usage)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from jaxllm.engine import Engine, RequestOutput

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                  0.5, 0.75, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        label = {"model_name": model_name}
        r, names = self.registry, ["model_name"]
        self.requests = Counter("vllm:request_success", "Finished requests",
                                names + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefilled prompt tokens",
                                     names, registry=r).labels(**label)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens",
                                         names, registry=r).labels(**label)
        self.running = Gauge("vllm:num_requests_running", "Requests running", names,
                             registry=r).labels(**label)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting", names,
                             registry=r).labels(**label)
        self.cache_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV pages in use",
                                 names, registry=r).labels(**label)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token",
                              names, buckets=_LATENCY, registry=r).labels(**label)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency", names,
                             buckets=_LATENCY, registry=r).labels(**label)
        self.step_failures = Counter("jaxllm:engine_step_failures",
                                     "Engine steps that failed (their requests got an error)",
                                     names, registry=r).labels(**label)
        self.step_time = Histogram("jaxllm:engine_step_seconds", "Engine step time", names,
                                   buckets=_LATENCY, registry=r).labels(**label)
        self.preemptions = Counter("vllm:num_preemptions", "Requests preempted (recomputed "
                                   "later) for want of KV pages", names,
                                   registry=r).labels(**label)
        self.group_usage = Gauge("jaxllm:kv_cache_group_usage_perc", "Fraction of the KV "
                                 "page pool held by each layer group", names + ["group"],
                                 registry=r)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Time per output token "
                              "after the first: (latency - TTFT) / (output tokens - 1)", names,
                              buckets=_TOKEN_LATENCY, registry=r).labels(**label)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between two tokens of "
                             "a request", names, buckets=_TOKEN_LATENCY,
                             registry=r).labels(**label)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Time a request waited "
                                    "before its first step", names, buckets=_LATENCY,
                                    registry=r).labels(**label)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in "
                                      "the prefix cache", names, registry=r).labels(**label)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens served from the "
                                   "prefix cache", names, registry=r).labels(**label)
        # Speculative decoding (vLLM's names): sequence-steps with drafts, drafted and accepted
        # tokens, and per draft position the sequence-steps that accepted it.
        self.spec_drafts = Counter("vllm:spec_decode_num_drafts", "Sequence-steps that "
                                   "verified drafts", names, registry=r).labels(**label)
        self.spec_draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Draft tokens "
                                         "verified", names, registry=r).labels(**label)
        self.spec_accepted = Counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens "
                                     "accepted", names, registry=r).labels(**label)
        self.spec_accepted_per_pos = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted at each "
            "draft position", names + ["position"], registry=r)
        self._spec_seen = (0, 0, 0, ())
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
        self._spec(getattr(engine, "speculator", None))
        for group, held in enumerate(engine.scheduler.pages_held_by_group()):
            kind = "global" if pages.group_chunk[group] is None else "chunked"
            self.group_usage.labels(group=f"{group}-{kind}", **self._label).set(
                held / pages.num_pages)

    def _spec(self, speculator) -> None:
        """Adds what the engine's speculation counters gained since the last refresh."""
        if speculator is None:
            return
        st = speculator.stats
        drafts, tokens, accepted, per_pos = self._spec_seen
        self.spec_drafts.inc(st.num_drafts - drafts)
        self.spec_draft_tokens.inc(st.num_draft_tokens - tokens)
        self.spec_accepted.inc(st.num_accepted_tokens - accepted)
        for j, count in enumerate(st.accepted_per_position):
            before = per_pos[j] if j < len(per_pos) else 0
            self.spec_accepted_per_pos.labels(position=str(j), **self._label).inc(count - before)
        self._spec_seen = (st.num_drafts, st.num_draft_tokens, st.num_accepted_tokens,
                           tuple(st.accepted_per_position))

    def on_step_failure(self) -> None:
        self.step_failures.inc()

    def on_finish(self, reason: str, prompt_tokens: int, ttft: float | None, e2e: float,
                  *, output_tokens: int = 0, cached_tokens: int = 0,
                  inter_token: Sequence[float] = (), queued: float | None = None) -> None:
        """Records one finished request (any way it ended)."""
        self.requests.labels(finished_reason=reason, **self._label).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.prefix_queries.inc(prompt_tokens)
        self.prefix_hits.inc(cached_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
            if output_tokens > 1:
                self.tpot.observe((e2e - ttft) / (output_tokens - 1))
        for seconds in inter_token:
            self.itl.observe(seconds)
        if queued is not None:
            self.queue_time.observe(queued)
        self.e2e.observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)
