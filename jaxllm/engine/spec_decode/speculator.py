"""Speculative decoding on the engine's side (``--speculative-config``, methods ngram and
eagle3): drafts for a step's pieces before it is built, and what verification's result
commits after it.

A piece that picks its request's next token, and whose last token the host knows, ends in up to k
drafts: n-gram drafts (``jaxllm.engine.spec_decode.ngram``), or the drafts an EAGLE-3 head made for
it in the step that picked that token (``jaxllm.engine.spec_decode.eagle``: they come back with the
step's picks, and only the step right after may use them); capped by the request's ``max_tokens``
left (the emitted tokens are the accepted drafts and one more), by ``max_model_len``, by the step's
token budget, and by free pages (drafts never preempt anyone). The compiled step verifies
them (``jaxllm.sample.verify_step``), each position adjusted for logit_bias, min_tokens, the
penalties (the drafts before it counted as generated) and the structured-output mask. A
constrained request's drafts are cut at the first its grammar refuses, and the engine sends
the grammar's masks after each draft (``GrammarCompiler.draft_masks``), for at most
``MASKED_DRAFTERS`` such requests a step. Requests with prompt_logprobs never draft: prompt
log-probabilities are not computed in a verifying step.

After the step the engine takes the emitted tokens one at a time (``Request.accept``,
stopping at the first that ends the request); a request that goes on keeps the KV of its
last token and its accepted drafts: ``num_computed`` drops the rejected ones (their slots
are written over by the next step before anything reads them) and its pages are settled up
to the committed end, so the prefix cache never sees a rejected token.

Async scheduling: n-gram drafts need the request's last token on the host, and EAGLE-3
drafts the step's outputs, so a step with drafts, or one that ends a prompt that may draft,
is read before the next is dispatched; and while a running request could draft (n-gram: its
known tokens give a draft; eagle3: it may still draft at all) the engine stops dispatching
ahead, so the next step is built with every token and draft known. Without drafts to make,
steps overlap as usual.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from jaxllm.buckets import BucketPolicy
from jaxllm.engine.request import Request
from jaxllm.engine.scheduler import Scheduled, Scheduler
from jaxllm.engine.spec_decode.config import SpeculativeConfig
from jaxllm.engine.spec_decode.ngram import propose
from jaxllm.engine.step import MASKED_DRAFTERS

if TYPE_CHECKING:
    from jaxllm.engine.spec_decode.eagle import EagleDrafter


@dataclasses.dataclass
class SpecStats:
    """Counters under vLLM's meanings: sequence-steps with drafts, drafted tokens, accepted
    tokens, and per draft position j the sequence-steps that accepted more than j drafts."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)

    @property
    def acceptance_length(self) -> float:
        """Tokens emitted per sequence-step with drafts (accepted drafts plus one)."""
        return 1.0 + self.num_accepted_tokens / max(1, self.num_drafts)


class Speculator:
    """Drafting for the engine (n-gram on the host, or an EAGLE-3 head's drafts kept from
    the last step), and the counters of what verification accepted."""

    def __init__(self, config: SpeculativeConfig, policy: BucketPolicy,
                 drafter: EagleDrafter | None = None, vocab_size: int | None = None):
        """``drafter``: the loaded head, for method eagle3; ``vocab_size``: the target's
        (drafts outside it are dropped before they reach a step)."""
        if (config.method == "eagle3") != (drafter is not None):
            raise ValueError(f"speculative-config method={config.method!r} "
                             + ("needs its EAGLE-3 head loaded" if drafter is None
                                else "takes no EAGLE-3 head"))
        self.config, self.policy, self.drafter = config, policy, drafter
        self.vocab_size = vocab_size
        self.k = config.num_speculative_tokens
        self.stats = SpecStats(accepted_per_position=[0] * self.k)
        self._drafts_expected = False
        # EAGLE-3: request id -> (its epoch, its known tokens, the head's drafts after them),
        # from the last step that picked for it.
        self._proposals: dict[str, tuple[int, int, np.ndarray]] = {}

    def describe(self) -> str:
        """The start-up report's line."""
        c = self.config
        if self.drafter is not None:
            return (f"speculative decoding: eagle3, {self.k} draft tokens from the "
                    f"{self.drafter.describe()}; steps are read before the next is dispatched "
                    "while a request may draft")
        return (f"speculative decoding: ngram, {self.k} draft tokens, prompt lookup "
                f"{c.prompt_lookup_min}..{c.prompt_lookup_max}; steps with drafts are read "
                "before the next is dispatched")

    def _propose(self, request: Request, limit: int) -> np.ndarray:
        if self.drafter is not None:
            return self._proposed(request, limit)
        c = self.config
        return propose(request.token_array(), min_n=c.prompt_lookup_min,
                       max_n=c.prompt_lookup_max, k=min(self.k, limit),
                       max_model_len=self.policy.max_model_len)

    def _proposed(self, request: Request, limit: int) -> np.ndarray:
        """The head's drafts after the request's known tokens (none when they were made
        for other tokens: before a preemption, or a step that was dispatched ahead), cut
        at ``limit`` and at the first id outside the vocabulary."""
        held = self._proposals.get(request.request_id)
        known = len(request.prompt) + len(request.output)
        if held is None or held[:2] != (request.epoch, known):
            return np.zeros(0, np.int32)
        drafts = held[2][:limit]
        bad = np.flatnonzero((drafts < 0) | (drafts >= self.vocab_size))
        return drafts[: bad[0]] if bad.size else drafts

    def remember(self, scheduled: Sequence[Scheduled], drafts: np.ndarray | None) -> None:
        """After a step's bookkeeping: keeps the head's drafts ``[S, k]`` of each piece that
        picked for a request that goes on, for its next step (and forgets older ones)."""
        self._proposals = {}
        if drafts is None:
            return
        for s, row in zip(scheduled, drafts, strict=False):
            request = s.request
            if s.samples and request.finish_reason is None:
                self._proposals[request.request_id] = (
                    request.epoch, len(request.prompt) + len(request.output), row)

    def _limit(self, request: Request) -> int:
        """The most drafts ``request`` may bring now (0: none): its max_tokens left after
        the token the step picks anyway, and the context left."""
        sampling, known = request.sampling, len(request.prompt) + len(request.output)
        if sampling.prompt_logprobs is not None:
            return 0
        return min(self.k, sampling.max_tokens - len(request.output) - 1,
                   self.policy.max_model_len - known - 1)

    def draft(self, scheduled: Sequence[Scheduled], scheduler: Scheduler) -> list[Scheduled]:
        """``scheduled`` with drafts after the pieces that can take them (module docstring),
        within the step's token budget."""
        budget = self.policy.max_num_batched_tokens - sum(s.num_tokens for s in scheduled)
        out, constrained = [], 0
        for s in scheduled:
            request = s.request
            known = len(request.prompt) + len(request.output)
            limit = min(budget, self._limit(request))
            if s.samples and s.start + s.num_tokens == known and limit > 0:
                drafts = self._propose(request, limit).tolist()
                if request.matcher is not None:  # the prefix the grammar accepts
                    drafts = (drafts[: request.matcher.validate_tokens(drafts)]
                              if constrained < MASKED_DRAFTERS else [])
                s = scheduler.speculate(s, drafts)
                budget -= len(s.drafts)
                constrained += request.matcher is not None and bool(s.drafts)
            out.append(s)
        return out

    def commit(self, s: Scheduled, num_accepted: int, scheduler: Scheduler) -> None:
        """After a request took all ``num_accepted + 1`` tokens a step emitted for ``s`` and
        goes on: its rejected drafts are no longer computed, and its pages are settled up to
        its committed tokens."""
        request = s.request
        if request.epoch != s.epoch:
            return
        rejected = len(s.drafts) - num_accepted
        request.num_computed -= rejected
        scheduler.settle(s, end=s.start + s.num_tokens - rejected)

    def count(self, num_drafts: int, num_accepted: int) -> None:
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += num_drafts
        stats.num_accepted_tokens += num_accepted
        for j in range(num_accepted):
            stats.accepted_per_position[j] += 1

    def overlaps(self, scheduled: Sequence[Scheduled]) -> bool:
        """Whether the step after ``scheduled`` may be dispatched before its picks are read:
        not when it verifies drafts, nor when it ends a prompt that may draft (the next step
        drafts from its first token), nor while a running request could draft."""
        if self.drafter is not None:  # every piece that picks may draft next
            return not self._drafts_expected and not any(
                s.samples and self._limit(s.request) > 0 for s in scheduled)
        return not self._drafts_expected and not any(
            s.drafts or (s.samples and not s.request.output and self._limit(s.request) > 0)
            for s in scheduled)

    def observe(self, running: Iterable[Request]) -> None:
        """After a step's bookkeeping: whether some running request's known tokens give a
        draft, or (eagle3) it may draft at all (then the engine lets the steps in flight end,
        to build the next with them)."""
        if self.drafter is not None:
            self._drafts_expected = any(self._limit(r) > 0 for r in running)
            return
        self._drafts_expected = any(
            (limit := self._limit(r)) > 0 and self._propose(r, limit).size for r in running)
