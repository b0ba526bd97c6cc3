"""Failed steps: what the engine raises when one fails, and a fault injector to test with.

Anything that raises inside a step fails it: scheduling, building or dispatching the step, the
device (an error that surfaces only when the outputs are read, after the KV cache was donated)
or non-finite logits. ``Engine.step`` then stops the requests of that step, recovers
(``Engine.recover``) and raises ``StepFailed``; when recovery fails too it raises
``RecoveryFailed``, and the engine cannot serve any more.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.engine.runner import ModelRunner, PendingStep


class StepFailed(RuntimeError):
    """A step failed: its requests (``request_ids``) were stopped, the engine recovered."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"engine step failed ({type(cause).__name__}: {cause})")
        self.request_ids, self.cause = request_ids, cause


class RecoveryFailed(RuntimeError):
    """Recovering from a failed step failed too: the engine cannot serve any more."""


class Fault(enum.Enum):
    BEFORE_DISPATCH = "before-dispatch"  # raises before the step runs; the cache is untouched
    AFTER_DISPATCH = "after-dispatch"  # the step ran on the donated cache, its outputs are lost
    NAN_LOGITS = "nan-logits"  # the step runs on NaN weights: non-finite logits and KV


class InjectedFault(RuntimeError):
    """The error a ``FaultInjector`` raises."""


class FaultInjector:
    """Makes chosen steps of ``runner`` fail the way ``fault`` says (for tests).

    Steps are ``run`` calls (every step: sampling, scoring, a follower's) counted from
    installation, from 1. With ``fail_recovery``, re-creating the cache raises too.
    ``remove()`` (or leaving a ``with`` block) undoes it.
    """

    def __init__(self, runner: ModelRunner, fault: Fault, steps: Collection[int], *,
                 fail_recovery: bool = False):
        self.runner, self.fault, self.steps = runner, fault, set(steps)
        self.fail_recovery = fail_recovery
        self.num_steps = 0
        self._run, self._reset_cache = runner.run, runner.reset_cache
        runner.run = self.run
        runner.reset_cache = self.reset_cache

    def remove(self) -> None:
        del self.runner.run, self.runner.reset_cache  # back to the class's methods

    def __enter__(self) -> FaultInjector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def run(self, *args: Any, **kwargs: Any) -> PendingStep:
        self.num_steps += 1
        if self.num_steps not in self.steps:
            return self._run(*args, **kwargs)
        error = InjectedFault(f"injected {self.fault.value} failure at step {self.num_steps}")
        if self.fault is Fault.BEFORE_DISPATCH:
            raise error
        if self.fault is Fault.NAN_LOGITS:
            model = self.runner.model
            params = model.params
            model.params = jax.tree.map(
                lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
            try:
                return self._run(*args, **kwargs)
            finally:
                model.params = params
        self._run(*args, **kwargs)
        for array in jax.tree.leaves(self.runner.cache):
            array.delete()  # what a failed computation leaves: outputs that cannot be read
        raise error

    def reset_cache(self) -> None:
        if self.fail_recovery:
            raise InjectedFault("injected failure re-creating the KV cache")
        self._reset_cache()
