"""Counting XLA compilations in a block: tests that assert nothing compiles after warm-up."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def count_compilations():
    """Yields a list that collects one entry per XLA backend compilation inside the block."""
    import jax

    compiles: list[str] = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
