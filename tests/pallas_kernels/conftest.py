"""Shared fixtures for the kernel tests."""

import pytest
from jax.experimental import pallas as pl


@pytest.fixture
def compiler_params_seen(monkeypatch) -> list:
    """Records the ``compiler_params`` of every ``pallas_call``: interpret mode ignores
    them, so this is how a CPU test knows the Triton settings reach the call."""
    seen = []
    real = pl.pallas_call

    def spy(*args, **kwargs):
        seen.append(kwargs.get("compiler_params"))
        return real(*args, **kwargs)

    monkeypatch.setattr(pl, "pallas_call", spy)
    return seen
