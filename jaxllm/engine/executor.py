"""The executor: runs the engine's steps on this process, or on every process of a
``jax.distributed`` group in lockstep.

Across processes, process 0 (the leader) runs the server, the scheduler and the sampler
bookkeeping; every other process (a follower) only runs steps (``follow``). For each step the
leader broadcasts a fixed-size header (a command, the step's token and batch buckets and
whether it brings image features), then the step's host arrays (``StepInputs``), whose
shapes those fix, in one message (an image's tiles go the same way before its encoder runs):
every process runs
the same compiled program on the same inputs, and none compiles a shape another did not.

A collective that does not return within the step timeout (a process died or hangs), or a
broadcast that fails, is fatal: the leader fails its requests (``on_failure``) and exits with
status 1 instead of hanging.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxllm.engine.runner import ModelRunner, PendingStep
from jaxllm.engine.step import Sampled, Scored, StepInputs

log = logging.getLogger("jaxllm.engine")


class Command(enum.IntEnum):
    """What the leader tells the followers to do next."""

    STEP = 1  # receive a step's inputs and run it
    RESET = 2  # re-create the KV cache (after a failed step)
    STOP = 3  # leave ``follow``
    ENCODE = 4  # receive an image's tiles and run the vision tower on them


class Executor:
    """Runs steps on ``runner``; with several processes, as the leader of them all.

    ``step_timeout`` (seconds, None: wait forever) bounds each step across processes;
    ``on_failure(reason)`` is called before the process exits when the group breaks.
    """

    def __init__(self, runner: ModelRunner, *, step_timeout: float | None = None,
                 exit_grace: float = 2.0):
        self.runner = runner
        self.distributed = jax.process_count() > 1
        self.leader = jax.process_index() == 0
        self.on_failure: Callable[[str], None] | None = None
        self.exit_grace = exit_grace
        self._watchdog = (Watchdog(step_timeout, self._fail)
                          if self.distributed and step_timeout else None)
        self._stopped = False

    def run(self, inputs: StepInputs) -> PendingStep:
        """``ModelRunner.run``, in every process: dispatches the step and returns without
        waiting; with several processes, reading its result is bounded by the step timeout.
        A bad step raises here, before anything is sent."""
        if not self.distributed:
            return self.runner.run(inputs)
        with self._guard("a step"):
            self._send(Command.STEP, inputs)
            pending = self.runner.run(inputs)
        return GuardedStep(pending, self._guard)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """``ModelRunner.encode``, in every process (the tower's weights span the mesh): the
        tiles, padded to their power-of-two bucket, are broadcast first."""
        if not self.distributed:
            return self.runner.encode(pixels)
        tiles = len(pixels)
        padded = np.zeros((1 << (tiles - 1).bit_length(), *pixels.shape[1:]), np.float32)
        padded[:tiles] = pixels
        with self._guard("an image encoding"):
            self._send(Command.ENCODE, padded)
            return self.runner.encode(padded)[:tiles]

    def reset_cache(self) -> None:
        """``ModelRunner.reset_cache`` (KV cache and penalty state), in every process."""
        with self._guard("a KV cache reset"):
            self._send(Command.RESET)
            self.runner.reset_cache()

    def stop(self) -> None:
        """Lets the followers leave ``follow`` (once; nothing to do for a single process)."""
        if self.distributed and not self._stopped:
            self._stopped = True
            with self._guard("the stop command"):
                self._send(Command.STOP)

    def follow(self) -> None:
        """A follower's loop: runs what the leader broadcasts, discarding the picks, until
        STOP."""
        if self.leader:
            raise RuntimeError("process 0 leads: it runs steps, it does not follow")
        while True:
            header = multihost_utils.broadcast_one_to_all(np.zeros(4, np.int32))
            command, rows, slots, images = (int(v) for v in header)
            if command == Command.STOP:
                return
            if command == Command.RESET:
                self.runner.reset_cache()
            elif command == Command.STEP:
                template = self.runner.empty_inputs(rows, slots, bool(images))
                message = multihost_utils.broadcast_one_to_all(pack(template))
                self.runner.run(unpack(message, template)).result()
            elif command == Command.ENCODE:
                vision = self.runner.model.require_vision()
                side = vision.image_size
                tiles = multihost_utils.broadcast_one_to_all(
                    np.zeros((rows, vision.num_channels, side, side), np.float32))
                self.runner.encode(np.asarray(tiles))
            else:
                raise RuntimeError(f"unknown command {command} from the leader")

    def _send(self, command: Command, inputs: StepInputs | np.ndarray | None = None) -> None:
        if not self.distributed:
            return
        if not self.leader:
            raise RuntimeError(f"process {jax.process_index()} follows: only process 0 "
                               "runs steps")
        if self._stopped and command != Command.STOP:
            raise RuntimeError("the followers were stopped")
        if inputs is None:
            header = [command, 0, 0, 0]
        elif isinstance(inputs, np.ndarray):  # an image's tiles
            header = [command, len(inputs), 0, 0]
        else:
            header = [command, inputs.tokens.shape[0], inputs.logits_rows.shape[0],
                      int(inputs.has_images)]
        try:
            multihost_utils.broadcast_one_to_all(np.array(header, np.int32))
            if isinstance(inputs, np.ndarray):
                multihost_utils.broadcast_one_to_all(inputs)
            elif inputs is not None:
                multihost_utils.broadcast_one_to_all(pack(inputs))
        except Exception as error:
            self._fail(f"broadcasting {command.name} to the followers failed "
                       f"({type(error).__name__}: {error})")

    def _guard(self, what: str) -> contextlib.AbstractContextManager:
        return self._watchdog.guard(what) if self._watchdog else contextlib.nullcontext()

    def _fail(self, reason: str) -> None:
        """The group is out of lockstep: nothing can run any more. Fails the requests, exits."""
        log.critical("%s; exiting: the processes cannot run steps together any more", reason)
        if self.on_failure is not None:
            try:
                self.on_failure(reason)
                time.sleep(self.exit_grace)  # the failed requests' answers go out
            except Exception:
                log.exception("failing the requests failed")
        os._exit(1)


class GuardedStep:
    """A step dispatched to every process, its result read under the step timeout."""

    def __init__(self, pending: PendingStep, guard: Callable[[str],
                 contextlib.AbstractContextManager]):
        self.pending, self._guard = pending, guard

    def result(self) -> tuple[Sampled, Scored | None]:
        with self._guard("a step"):
            return self.pending.result()


class Watchdog:
    """Calls ``on_expire(reason)``, from its own thread, when a guarded block outlives
    ``timeout`` seconds."""

    def __init__(self, timeout: float, on_expire: Callable[[str], None]):
        if timeout <= 0:
            raise ValueError(f"step timeout {timeout} must be > 0 seconds")
        self.timeout = timeout
        self._on_expire = on_expire
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._what = ""
        threading.Thread(target=self._watch, name="jaxllm-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        with self._cond:
            self._deadline, self._what = time.monotonic() + self.timeout, what
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._deadline = None

    def _watch(self) -> None:
        with self._cond:
            while self._deadline is None or time.monotonic() < self._deadline:
                self._cond.wait(None if self._deadline is None
                                else self._deadline - time.monotonic())
            what = self._what
        self._on_expire(f"{what} did not finish within the step timeout of {self.timeout:g} s "
                        "(a process of the group died or hangs)")


def pack(tree: Any) -> np.ndarray:
    """Every array of ``tree`` (a step's inputs) in one int32 message (their bits, not their
    values): one collective per step instead of one per array."""
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]
    wide = [leaf.dtype for leaf in leaves if leaf.dtype.itemsize != 4]
    if wide:
        raise TypeError(f"step inputs must be 4-byte arrays to pack, got {wide}")
    return np.concatenate([leaf.reshape(-1).view(np.int32) for leaf in leaves])


def unpack(message: np.ndarray, template: Any) -> Any:
    """``pack``'s inverse, into the shapes and dtypes of ``template``."""
    leaves, treedef = jax.tree.flatten(template)
    leaves = [np.asarray(leaf) for leaf in leaves]
    if (words := sum(leaf.size for leaf in leaves)) != message.size:
        raise ValueError(f"a message of {message.size} words for inputs of {words}")
    out, offset = [], 0
    for leaf in leaves:
        out.append(message[offset : offset + leaf.size].view(leaf.dtype).reshape(leaf.shape))
        offset += leaf.size
    return jax.tree.unflatten(treedef, out)


def agree_on_minimum(value: int) -> int:
    """The smallest of every process's ``value`` (each process calls it): a plan that fits
    every process's memory."""
    if jax.process_count() == 1:
        return value
    values = multihost_utils.process_allgather(np.array([value], np.int64))
    return int(np.min(values))
