"""JAX's persistent compilation cache for jaxllm's programs, and a counter of compilations.

A server start compiles one program per step bucket; with the cache on, a second start with
the same model and flags loads them from disk instead. The cache key covers the program, the
devices and the jax/XLA versions, so a stale entry is never used.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # also fires on a cache hit
CACHE_HIT = "/jax/compilation_cache/cache_hits"


def default_cache_dir() -> Path:
    """``$JAXLLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxllm/xla`` (``~/.cache/jaxllm/xla``)."""
    if os.environ.get("JAXLLM_CACHE_DIR"):
        return Path(os.environ["JAXLLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxllm" / "xla"


def enable(directory: str | Path | None) -> Path | None:
    """Caches every compiled program under ``directory`` (None or "" turns the cache off)."""
    if not directory:
        return None
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


class CompileCounter:
    """Counts, while open, the programs XLA compiled and those loaded from the cache."""

    def __init__(self):
        self.backend_compiles = 0
        self.cache_hits = 0

    @property
    def compiled(self) -> int:
        return self.backend_compiles - self.cache_hits

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE:
            self.backend_compiles += 1

    def _on_event(self, event: str, **kwargs) -> None:
        if event == CACHE_HIT:
            self.cache_hits += 1

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        jax.monitoring.unregister_event_listener(self._on_event)
