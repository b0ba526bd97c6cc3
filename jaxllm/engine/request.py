"""One record per sequence: admitted once, read by every step, ended by ``accept``.

A request is checked and resolved once, by ``jaxllm.runtime.admission.admit`` (token ids,
``max_tokens`` against ``max_model_len``, the seed, the stop set and its cap, logit_bias ids),
for the engine (``Engine.prepare``) and for ``generate()`` alike. The ``Request`` it builds carries
what the scheduler tracks (pages, tokens computed), what the step reads about it (its batch
row, whose rows of the persistent batch hold its sampling settings; ``jaxllm.engine.batch``)
and ``accept``, the one place a picked token is taken and a finish reason decided.

Names: a *batch row* is a running sequence's row of the persistent batch (and of the penalty
state: its *penalty slot* is its batch row); a *cache slot* is one token's place in the KV
cache (``jaxllm.layout.slot_of``); a *prefill piece* is the part of a prompt one step runs,
not to be confused with Llama 4's *attention chunk*.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from typing import Any

import numpy as np

from jaxllm.kv_cache import NULL_PAGE
from jaxllm.sample.sampling import SamplingParams

log = logging.getLogger("jaxllm.engine")


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """A sequence from admission to its end. ``sampling.max_tokens`` and ``sampling.seed``
    are resolved (``admit``)."""

    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    stop_ids: frozenset[int] = frozenset()
    output: list[int] = dataclasses.field(default_factory=list)
    # Per layer group, the request's block-table row (``PageRow``: an int32 array).
    pages: list = dataclasses.field(default_factory=list)
    # Tokens whose keys/values are in the cache, or will be once the steps in flight end.
    num_computed: int = 0
    num_cached_prompt: int = 0  # of the prompt, found in the prefix cache at admission
    page_hashes: list[bytes] = dataclasses.field(default_factory=list)  # of full pages
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_token: int | None = None  # the stop id (EOS included) that ended it, if one did
    arrived_at: float = dataclasses.field(default_factory=time.monotonic)
    # With prompt_logprobs: the score of prompt tokens 1, 2, ... (token 0 has none).
    scored_prompt: list = dataclasses.field(default_factory=list)
    first_scheduled_at: float | None = None
    # With structured outputs: the grammar's state (an ``llguidance.LLMatcher``), advanced
    # by each accepted token.
    matcher: Any = None
    # While running: its row of the persistent batch (and of the penalty state).
    batch_row: int | None = None
    # Tokens a dispatched step will pick for it that the host has not seen yet (0 or 1).
    num_in_flight: int = 0
    # Bumped whenever its pages are dropped: a step scheduled before then must not offer
    # the pages it wrote to the prefix cache.
    epoch: int = 0
    # Its prompt's images (``jaxllm.multimodal.feeder.RequestImages``), or None.
    images: Any = None
    # ``token_array``'s buffer and how much of it is filled (grown on demand).
    _array: np.ndarray | None = dataclasses.field(default=None, repr=False)
    _array_len: int = dataclasses.field(default=0, repr=False)

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_tokens

    @property
    def queued_seconds(self) -> float | None:
        """Time from arrival to the first step that ran it (None before that)."""
        if self.first_scheduled_at is None:
            return None
        return self.first_scheduled_at - self.arrived_at

    @property
    def num_tokens(self) -> int:
        """Prompt and output tokens, those still in flight included."""
        return len(self.prompt) + len(self.output) + self.num_in_flight

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_array(self) -> np.ndarray:
        """The known tokens (prompt and output) as int32, a read-only view of a buffer kept
        across calls: each call copies only the tokens accepted since the last one (n-gram
        drafting reads a running request's tokens every step; converting a 1M-token list
        took 30 ms each time). The buffer doubles as it fills."""
        n, filled = len(self.prompt) + len(self.output), self._array_len
        if self._array is None or self._array.shape[0] < n:
            grown = np.empty(max(n, 2 * filled, 64), np.int32)
            if self._array is not None:
                grown[:filled] = self._array[:filled]
            self._array = grown
        if filled < n:
            self._array[filled:n] = self.tokens_between(filled, n)
            self._array_len = n
        view = self._array[:n]
        view.flags.writeable = False
        return view

    def tokens_between(self, start: int, end: int) -> list[int]:
        """``tokens[start:end]`` without building the whole list (1M tokens at long
        contexts, every step); ``end`` may not pass the tokens the host knows."""
        n = len(self.prompt)
        if end <= n:
            return self.prompt[start:end]
        if start >= n:
            return self.output[start - n:end - n]
        return self.prompt[start:] + self.output[:end - n]

    @property
    def held_pages(self) -> list[int]:
        return [p for row in self.pages for p in row if p != NULL_PAGE]

    @property
    def num_pending(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def may_continue(self) -> bool:
        """Whether another token may follow the ones already picked (in flight included):
        not at ``max_tokens`` yet. A step for it may still be wasted on a stop token."""
        return len(self.output) + self.num_in_flight < self.sampling.max_tokens

    def accept(self, token: int) -> str | None:
        """Takes the token a step picked for this request; returns why the request ends
        ("stop": a stop id, EOS, or its grammar complete or refusing; "length"), or None.
        A token its grammar refuses is not kept."""
        if self.matcher is not None and not _advance(self.matcher, token):
            # The mask allowed only tokens the grammar accepts; a token outside it means
            # nothing was allowed (e.g. min_tokens holding back the only way to end).
            log.warning("request %s: token %d does not continue its grammar (%s); stopping it",
                        self.request_id, token, self.matcher.get_error())
            return "stop"
        self.output.append(int(token))
        if token in self.stop_ids:
            self.stop_token = int(token)
            return "stop"
        if self.matcher is not None and self.matcher.is_stopped():
            return "stop"  # the grammar is complete: nothing but EOS could follow
        if len(self.output) >= self.sampling.max_tokens:
            return "length"
        return None


def _advance(matcher, token: int) -> bool:
    """Feeds ``token`` to a request's grammar; False when the grammar refuses it (or the
    matcher fails: it must never take the engine thread down)."""
    try:
        return bool(matcher.consume_token(token))
    except Exception as error:  # noqa: BLE001 - reported, and the request is stopped
        log.error("grammar matcher failed on token %d: %s", token, error)
        return False
