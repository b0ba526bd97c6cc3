"""Prometheus metrics: what a step and a finished request record, and the exposition."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from jaxllm.serve.metrics import Metrics
from tests.jaxllm.serve.fakes import output

LABEL = {"model_name": "tiny"}


def _engine(running: int, waiting: int, free: int, total: int, preemptions: int = 0,
            held: tuple[int, ...] = (0, 0)):
    return SimpleNamespace(
        scheduler=SimpleNamespace(running=[None] * running, waiting=[None] * waiting,
                                  num_preemptions=preemptions,
                                  pages_held_by_group=lambda: list(held)),
        pages=SimpleNamespace(num_free=free, num_pages=total, group_chunk=(None, 16)))


def _value(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, {**LABEL, **labels})


def test_a_step_sets_the_gauges_and_counts_generated_tokens():
    metrics = Metrics("tiny")
    metrics.on_step(_engine(3, 2, free=30, total=40),
                    [output("a", [1]), output("b", [2, 3]), output("c", [])], 0.2)
    assert _value(metrics, "vllm:num_requests_running") == 3
    assert _value(metrics, "vllm:num_requests_waiting") == 2
    assert _value(metrics, "vllm:kv_cache_usage_perc") == 0.25
    assert _value(metrics, "vllm:generation_tokens_total") == 3
    assert _value(metrics, "jaxllm:engine_step_seconds_count") == 1
    assert _value(metrics, "jaxllm:engine_step_seconds_sum") == 0.2
    metrics.on_step(_engine(0, 0, free=40, total=40), [], 0.1)
    assert _value(metrics, "vllm:num_requests_running") == 0
    assert _value(metrics, "vllm:kv_cache_usage_perc") == 0.0
    assert _value(metrics, "vllm:generation_tokens_total") == 3
    assert _value(metrics, "jaxllm:engine_step_seconds_count") == 2


def test_preemptions_and_the_pages_of_each_layer_group():
    metrics = Metrics("tiny")
    metrics.on_step(_engine(2, 0, free=30, total=40, preemptions=2, held=(6, 4)), [], 0.1)
    metrics.on_step(_engine(2, 0, free=30, total=40, preemptions=3, held=(8, 2)), [], 0.1)
    assert _value(metrics, "vllm:num_preemptions_total") == 3
    assert _value(metrics, "jaxllm:kv_cache_group_usage_perc", group="0-global") == 8 / 40
    assert _value(metrics, "jaxllm:kv_cache_group_usage_perc", group="1-chunked") == 2 / 40


def test_finished_requests_by_reason_prompt_tokens_and_latencies():
    metrics = Metrics("tiny")
    metrics.on_finish("stop", 10, ttft=0.03, e2e=0.5)
    metrics.on_finish("stop", 4, ttft=0.02, e2e=0.3)
    metrics.on_finish("abort", 6, ttft=None, e2e=0.1)  # never produced a token
    assert _value(metrics, "vllm:request_success_total", finished_reason="stop") == 2
    assert _value(metrics, "vllm:request_success_total", finished_reason="abort") == 1
    assert _value(metrics, "vllm:request_success_total", finished_reason="length") is None
    assert _value(metrics, "vllm:prompt_tokens_total") == 20
    assert _value(metrics, "vllm:time_to_first_token_seconds_count") == 2
    assert _value(metrics, "vllm:e2e_request_latency_seconds_count") == 3
    assert _value(metrics, "vllm:e2e_request_latency_seconds_bucket", le="0.25") == 1


def test_tpot_itl_queue_time_and_prefix_cache_tokens():
    """vLLM's definitions: TPOT = (latency - TTFT) / (output tokens - 1); one ITL sample per
    gap between tokens; prefix-cache queries and hits count prompt tokens."""
    metrics = Metrics("tiny")
    metrics.on_finish("stop", 40, ttft=0.2, e2e=1.0, output_tokens=5, cached_tokens=32,
                      inter_token=[0.1, 0.3, 0.2, 0.2], queued=0.05)
    metrics.on_finish("length", 8, ttft=0.1, e2e=0.1, output_tokens=1, cached_tokens=0)
    assert _value(metrics, "vllm:time_per_output_token_seconds_count") == 1
    assert _value(metrics, "vllm:time_per_output_token_seconds_sum") == 0.2  # (1.0-0.2)/4
    assert _value(metrics, "vllm:inter_token_latency_seconds_count") == 4
    assert abs(_value(metrics, "vllm:inter_token_latency_seconds_sum") - 0.8) < 1e-12
    assert _value(metrics, "vllm:request_queue_time_seconds_count") == 1
    assert _value(metrics, "vllm:prefix_cache_queries_total") == 48
    assert _value(metrics, "vllm:prefix_cache_hits_total") == 32


def test_render_is_prometheus_text_of_this_server_only():
    metrics = Metrics("tiny")
    metrics.on_finish("length", 1, 0.01, 0.01)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert {"vllm:request_success", "vllm:prompt_tokens", "vllm:generation_tokens",
            "vllm:num_requests_running", "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds",
            "vllm:e2e_request_latency_seconds", "jaxllm:engine_step_seconds"} <= set(families)
    samples = families["vllm:request_success"].samples
    assert any(s.labels == {**LABEL, "finished_reason": "length"} and s.value == 1
               for s in samples)
    # No process collectors: only the server's own names.
    assert all(name.startswith(("vllm:", "jaxllm:")) for name in families)
    # Two servers in one process keep separate registries.
    assert _value(Metrics("tiny"), "vllm:prompt_tokens_total") == 0
