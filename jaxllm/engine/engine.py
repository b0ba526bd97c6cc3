"""The engine: requests in, tokens out, one scheduled step at a time, the next one already
on the device while the host takes the last one's picks (async scheduling).

With async scheduling (the default) ``step`` dispatches step N+1 before it reads step N's
picks: a decoding sequence's input token for N+1 is N's pick, taken on the device
(``StepInputs.from_last``), so the host's bookkeeping of N (stops, outputs, streaming) runs
while N+1 runs. A sequence that stops at N has its extra row in N+1 discarded; a sequence
whose next mask needs its last token (structured outputs) skips N+1 and runs in N+2; a step
whose dispatch fails is reported after the step before it has been read. Every output is
the one the synchronous engine gives: a token's sampler key depends only on its request's
seed and index.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxllm.engine.batch import InputBatch, SlotPlan, StepPlan, plans_for
from jaxllm.engine.executor import Executor, agree_on_minimum
from jaxllm.engine.faults import RecoveryFailed, StepFailed
from jaxllm.engine.memory import (
    pages_for_sequence,
    plan_for_model,
    startup_report,
    weights_bytes_per_device,
)
from jaxllm.engine.pages import PageAllocator
from jaxllm.engine.request import Request
from jaxllm.engine.runner import ModelRunner, PendingStep, encoder_bytes, step_temp_bytes
from jaxllm.engine.scheduler import Scheduled, Scheduler
from jaxllm.engine.spec_decode.config import SpeculativeConfig
from jaxllm.engine.spec_decode.eagle import EagleDrafter
from jaxllm.engine.spec_decode.speculator import Speculator
from jaxllm.engine.step import Emitted, Sampled, Scored
from jaxllm.layout import SeqPiece, pages_for
from jaxllm.multimodal.feeder import MAX_IMAGE_TILES, ImageFeeder, PieceImages, request_images
from jaxllm.runtime.admission import admit
from jaxllm.runtime.handle import Model
from jaxllm.sample.sampling import SamplingParams

if TYPE_CHECKING:
    from jaxllm.sample.grammar import GrammarCompiler

log = logging.getLogger("jaxllm.engine")


class TopLogprobs(Sequence):
    """The most likely tokens of a row as (token id, log-probability) pairs, best first: read
    from the step's arrays only when asked for (most requests never are)."""

    __slots__ = ("_ids", "_values")

    def __init__(self, ids: np.ndarray, values: np.ndarray):
        self._ids, self._values = ids, values

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return list(zip(self._ids[index].tolist(), self._values[index].tolist(),
                            strict=True))
        return int(self._ids[index]), float(self._values[index])

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


@dataclasses.dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: Sequence[tuple[int, float]]  # the most likely tokens, best first


@dataclasses.dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    logprobs: Sequence[TokenLogprob]  # one per new token (``PickedLogprobs``: built when read)
    finished: bool
    finish_reason: str | None  # "stop" (EOS or a stop id), "length", "abort"
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    num_output_tokens: int
    queued_seconds: float | None = None  # from admission check to the first scheduled step
    # With prompt_logprobs, on a request's first output: prompt tokens 1.. scored.
    prompt_logprobs: list[TokenLogprob] | None = None
    stop_token: int | None = None  # the stop id (EOS included) that ended it, the last token


@dataclasses.dataclass(frozen=True)
class LaunchedStep:
    scheduled: list[Scheduled]
    pending: PendingStep


@dataclasses.dataclass(frozen=True)
class FailedLaunch:
    """A step whose scheduling, building or dispatch raised."""

    scheduled: list[Scheduled]
    error: BaseException


class Engine:
    """Continuous batching over ``model``'s paged KV cache.

    The KV cache holds ``num_pages`` pages, or what ``kv_cache_memory_bytes`` holds, or the
    device's ``gpu_memory_utilization`` share after the weights and the step's temporaries
    (``jaxllm.engine.memory.plan_kv_cache``). Across processes every process builds the
    engine (the same plan: the smallest any process makes); process 0 steps it and the others
    ``executor.follow()`` (``jaxllm.engine.executor``), each step bounded by ``step_timeout``.
    With ``speculative``, decode pieces bring drafts that the step verifies
    (``jaxllm.engine.spec_decode.speculator``): n-gram drafts, or (method eagle3) the drafts an
    EAGLE-3
    head made in the step before (``jaxllm.engine.spec_decode.eagle.EagleDrafter``).
    """

    def __init__(self, model: Model, *, num_pages: int | None = None,
                 kv_cache_memory_bytes: int | None = None,
                 gpu_memory_utilization: float | None = None,
                 max_num_batched_tokens: int | None = None, seed: int | None = None,
                 step_timeout: float | None = None, async_scheduling: bool = True,
                 speculative: SpeculativeConfig | None = None,
                 max_image_tiles: int = MAX_IMAGE_TILES, encoder_cache_rows: int | None = None):
        self.model = model
        self.async_scheduling = async_scheduling
        # The engine's configuration, derived once and handed whole to every part: the
        # model's, with its step width and a cache sized by the memory plan.
        base = model.bucket_policy
        if max_num_batched_tokens is not None:
            base = dataclasses.replace(base, max_num_batched_tokens=max_num_batched_tokens)
        groups = base.cache.groups(model.config)
        probe = base.for_engine(max(base.pages_per_seq,
                                    pages_for_sequence(base, groups, base.max_model_len)))
        images = lambda: encoder_bytes(model, probe, max_image_tiles)  # noqa: E731
        k = speculative.num_speculative_tokens if speculative else 0
        # An EAGLE-3 head: its weights, and its KV slab in every page (``EagleDrafter``).
        drafter = None
        if speculative is not None and speculative.method == "eagle3":
            drafter = EagleDrafter.load(speculative.model, model, k)
        head = dict(extra_page_bytes=drafter.bytes_per_page(),
                    extra_weights_bytes=drafter.weights_bytes()) if drafter else {}
        # The widest step's temporaries: the verifying step's when the engine speculates.
        temp = lambda: step_temp_bytes(model, probe, k, drafter)  # noqa: E731
        self.plan = plan_for_model(
            model, base, temp, images, num_pages=num_pages,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            gpu_memory_utilization=gpu_memory_utilization, **head)
        if (agreed := agree_on_minimum(self.plan.num_pages)) != self.plan.num_pages:
            self.plan = plan_for_model(model, base, temp, images, num_pages=agreed, **head)
        self.policy = base.for_engine(self.plan.num_pages)
        self.groups = groups
        self.pages = PageAllocator(self.policy.cache, groups.group_chunk)
        self.scheduler = Scheduler(self.policy, self.pages)
        self.speculator = (Speculator(speculative, self.policy, drafter,
                                      model.config.vocab_size) if speculative else None)
        self.runner = ModelRunner(model, self.policy, k, drafter)
        self.executor = Executor(self.runner, step_timeout=step_timeout)
        self.batch = InputBatch(self.policy, groups.group_chunk, self.runner.mask_words, k,
                                self.runner.feature_words)
        # Images (``jaxllm.multimodal.feeder``): encoded once each, kept in an encoder cache
        # of at least one step's tokens (vLLM's default) and one largest image.
        self.images: ImageFeeder | None = None
        if (vision := model.config.vision) is not None:
            rows = encoder_cache_rows or max(self.policy.max_num_batched_tokens,
                                             max_image_tiles * vision.tokens_per_tile)
            self.images = ImageFeeder(vision, self.executor.encode, rows, model.dtype,
                                      max_image_tiles)
            self.scheduler.images = self.images
        self.requests: dict[str, Request] = {}
        self._in_flight: LaunchedStep | FailedLaunch | None = None
        # Request id -> its sequence slot in the step in flight that picks its next token
        # (read by the next step's ``from_last``).
        self._last_slot: dict[str, int] = {}
        # Compiles structured-output grammars against the tokenizer (set by whoever has one,
        # e.g. the server); requests with ``sampling.structured`` are refused without it.
        self.grammars: GrammarCompiler | None = None
        self._ids = itertools.count()
        # Seeds for requests that bring none: reproducible runs when the engine has a seed.
        self._seeds = random.Random(seed if seed is not None else secrets.randbits(64))

    def prepare(self, prompt: Sequence[int], sampling: SamplingParams | None = None,
                request_id: str | None = None, *, ignore_eos: bool = False,
                images: Sequence[Any] = ()) -> Request:
        """Checks a request and builds it, changing nothing: bad ids, lengths or images raise
        ValueError here, before any device work (safe to call from another thread).
        ``images``: the prompt's images in order (``ProcessedImage``s or tiles
        ``[N, C, S, S]``), whose features its ``<|patch|>`` tokens take (the prompt is
        expanded: ``jaxllm.multimodal.prompt.expand_prompt``)."""
        admitted = admit(prompt, sampling or SamplingParams(), self.policy,
                         vocab_size=self.model.config.vocab_size,
                         eos_token_ids=self.model.eos_token_ids,
                         seed=self._seeds.getrandbits(63), ignore_eos=ignore_eos)
        matcher = None
        if admitted.sampling.structured is not None:
            if self.grammars is None:
                raise ValueError("structured outputs need the model's tokenizer, and this "
                                 "engine has none")
            matcher = self.grammars.matcher(admitted.sampling.structured)
        vision = self.model.config.vision
        tiles = self.images.max_tiles if self.images is not None else MAX_IMAGE_TILES
        return Request(request_id or f"req-{next(self._ids)}", admitted.prompt,
                       admitted.sampling, admitted.stop_ids, matcher=matcher,
                       images=request_images(admitted.prompt, images, vision, tiles))

    def submit(self, request: Request) -> str:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.scheduler.add(request)
        return request.request_id

    def add_request(self, prompt: Sequence[int], sampling: SamplingParams | None = None,
                    request_id: str | None = None, images: Sequence[Any] = ()) -> str:
        """Checks and queues a request (``prepare``); returns its id."""
        return self.submit(self.prepare(prompt, sampling, request_id, images=images))

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None and request.finish_reason is None:
            self.scheduler.finish(request, "abort")

    def has_unfinished(self) -> bool:
        """Whether a request is unfinished: waiting, running, or in the step in flight (a
        step whose requests have all ended since is read by the next ``step`` call)."""
        return self.scheduler.has_work() or (
            self._in_flight is not None
            and any(s.request.finish_reason is None for s in self._in_flight.scheduled))

    def step(self) -> list[RequestOutput]:
        """Returns what each request gained in the oldest step in flight, dispatching that
        step first when none is. With async scheduling the next step is scheduled and
        dispatched before this one's picks are read, so the device runs it while the host
        does this one's bookkeeping (the module docstring).

        A step that fails (anything raising in it, or non-finite logits) stops its own
        requests, recovers the engine (``recover``) and raises ``StepFailed``."""
        if self._in_flight is None:
            self._in_flight = self._launch()
            if self._in_flight is None:
                return []
        current, self._in_flight = self._in_flight, None
        if isinstance(current, FailedLaunch):
            raise self._failed(current.scheduled, current.error)
        if self.async_scheduling and (self.speculator is None
                                      or self.speculator.overlaps(current.scheduled)):
            self._in_flight = self._launch()
        try:
            sampled, scored = current.pending.result()
        except Exception as error:
            self._in_flight = None  # ran on the failed step's cache: its work is lost
            raise self._failed(current.scheduled, error) from error
        outputs = self._bookkeeping(current.scheduled, sampled, scored)
        if self.speculator is not None:
            self.speculator.remember(current.scheduled, sampled.drafts)
            self.speculator.observe(self.scheduler.running)
        return outputs

    def _launch(self) -> LaunchedStep | FailedLaunch | None:
        """Schedules the next step and dispatches it; never raises (a failure is returned, to
        be raised once the step before it has been read)."""
        scheduled: list[Scheduled] = []
        try:
            scheduled = self.scheduler.schedule()
            if not scheduled:
                return None
            if self.speculator is not None and not self._takes_images(scheduled):
                scheduled = self.speculator.draft(scheduled, self.scheduler)
            inputs = self.batch.inputs(self._step_plan(scheduled),
                                       *self._token_masks(scheduled))
            return LaunchedStep(scheduled, self.executor.run(inputs))
        except Exception as error:  # noqa: BLE001 - raised by ``step``, after recovery
            return FailedLaunch(scheduled, error)

    def _takes_images(self, scheduled: Sequence[Scheduled]) -> bool:
        """Whether a piece of the step takes image features: such a step verifies no drafts,
        so no verifying program has an image variant (each program's kernels are JIT code
        mapped into the process on CPU, whose map count is bounded)."""
        return self.images is not None and any(
            self.images.covers(s.request, s.start, s.num_tokens) for s in scheduled)

    def _step_plan(self, scheduled: Sequence[Scheduled]) -> StepPlan:
        """The step's slots, in one pass over its scheduled pieces (the hot path: every
        running sequence, every step); a row whose token the step in flight picks takes it
        from that step's picks on the device (``from_last``)."""
        plan = StepPlan()
        last_slot, slot_of = self._last_slot, {}
        scores = any(s.request.sampling.prompt_logprobs is not None for s in scheduled)
        if scores:
            plan.targets = []
        for index, s in enumerate(scheduled):
            request = s.request
            if s.admitted:
                self.batch.write(request.batch_row, request.sampling, sorted(request.stop_ids),
                                 request.pages)
            start, n, drafts = s.start, s.num_tokens, s.drafts
            end = start + n - len(drafts)
            num_prompt = len(request.prompt)
            num_known = num_prompt + len(request.output)
            known = min(end, num_known)
            if known < end:  # the one token in flight
                plan.tokens += request.tokens_between(start, known)
                plan.tokens.append(0)
                plan.from_last.append(last_slot[request.request_id])
            else:
                plan.tokens += request.tokens_between(start, end)
                plan.from_last.append(-1)
            if drafts:
                plan.tokens += drafts
            if s.samples:
                slot_of[request.request_id] = index
            plan.batch_rows.append(request.batch_row)
            plan.num_cached.append(start)
            plan.lengths.append(n)
            plan.held.append(len(request.pages[0]))
            plan.steps.append(len(request.output) + request.num_in_flight - s.samples)
            plan.penalized.append(request.sampling.has_penalties)
            plan.num_prompt.append(num_prompt)
            plan.num_drafts.append(len(drafts))
            # A prompt chunk short of its end: the token after it (an EAGLE-3 head reads it).
            plan.next_tokens.append(request.tokens_between(end, end + 1)[0]
                                    if not s.samples and end < num_known else -1)
            if scores:
                plan.targets += _prompt_targets(s) or [-1] * n
            if request.images is not None:  # the image features its rows take
                if plan.images is None:
                    plan.images = [None] * index
                plan.images.append(self.images.piece(request, start, n))
            elif plan.images is not None:
                plan.images.append(None)
        self._last_slot = slot_of
        return plan

    def _bookkeeping(self, scheduled: Sequence[Scheduled], picked: Sampled | Emitted,
                     scored: Scored | None) -> list[RequestOutput]:
        """Takes a finished step's picks: each request's tokens (``Request.accept``, one at a
        time up to the first that ends it: a verifying step emits several), its prompt scores
        and pages; a request that ended since the step was dispatched (it stopped in the step
        before, or was aborted) gets nothing."""
        outputs = []
        row = 0
        verifying = isinstance(picked, Emitted)
        # One conversion per step, not a numpy scalar read per sequence.
        picks = picked.tokens.tolist()
        accepted_counts = picked.num_accepted.tolist() if verifying else None
        settle = self.scheduler.settle
        for i, s in enumerate(scheduled):
            request, first_row = s.request, row
            row += s.num_tokens
            if request.finish_reason is not None:
                continue
            if scored is not None:
                _record_prompt_scores(s, scored, first_row)
            if not s.drafts:  # else once verification has said where its tokens end
                settle(s)
            if not s.samples:
                continue  # a prefill piece that has not reached the prompt's end
            request.num_in_flight -= 1
            if request.sampling.max_tokens == 0:  # the prompt is scored; nothing to generate
                self._finish(request, "length")
                outputs.append(RequestOutput(
                    request.request_id, [], [], True, "length", len(request.prompt),
                    request.num_cached_prompt, 0, request.queued_seconds,
                    request.scored_prompt))
                continue
            first = not request.output
            emitted = picks[i][: accepted_counts[i] + 1] if verifying else (picks[i],)
            tokens, reason = [], None
            for token in emitted:
                kept = len(request.output)
                reason = request.accept(token)
                if len(request.output) > kept:  # else its grammar refused the token (last)
                    tokens.append(token)
                if reason is not None:
                    break
            if s.drafts:
                accepted = accepted_counts[i]
                self.speculator.count(len(s.drafts), accepted)
                if reason is None:
                    self.speculator.commit(s, accepted, self.scheduler)
            if reason is not None:
                self._finish(request, reason)
            outputs.append(RequestOutput(
                request.request_id, tokens, PickedLogprobs(picked, i, len(tokens)),
                reason is not None, reason, len(request.prompt), request.num_cached_prompt,
                len(request.output), request.queued_seconds,
                request.scored_prompt if request.sampling.prompt_logprobs is not None
                and first and tokens else None, request.stop_token))
        return outputs

    def _finish(self, request: Request, reason: str) -> None:
        self.scheduler.finish(request, reason)
        self.requests.pop(request.request_id, None)

    def _failed(self, scheduled: Sequence[Scheduled], error: BaseException) -> StepFailed:
        """Stops the failed step's requests and recovers; the error to raise."""
        failed = [s.request for s in scheduled if s.request.finish_reason is None]
        ids = [r.request_id for r in failed]
        log.error("engine step failed (%s: %s); stopping its requests %s",
                  type(error).__name__, error, ids, exc_info=error)
        preempted = self.recover(failed)
        log.warning("recovered: KV cache re-created, prefix cache emptied, every page free; "
                    "%d requests queued, %d of them preempted to be recomputed",
                    len(self.requests), preempted)
        failure = StepFailed(ids, error)
        failure.__cause__ = error
        return failure

    def _token_masks(self, scheduled: Sequence[Scheduled]
                     ) -> tuple[dict[int, np.ndarray] | None, dict[int, np.ndarray] | None]:
        """The allowed tokens of each constrained sequence that picks a token this step
        (``jaxllm.sample.grammar``), and of those that draft at their positions past the first,
        keyed by index in the step (``InputBatch.inputs``)."""
        constrained = [(i, s) for i, s in enumerate(scheduled)
                       if s.samples and s.request.matcher is not None]
        if not constrained:
            return None, None
        assert self.grammars is not None  # a request has a matcher only through it
        words = self.runner.mask_words
        masks = self.grammars.masks([s.request.matcher for _, s in constrained], words)
        drafting = [(i, s) for i, s in constrained if s.drafts]
        later = self.grammars.draft_masks([(s.request.matcher, s.drafts) for _, s in drafting],
                                          words)
        return ({i: masks[k] for k, (i, _) in enumerate(constrained)},
                {i: m for (i, _), m in zip(drafting, later, strict=True)})

    def report(self) -> list[str]:
        """The start-up report: memory, pages, concurrency (``jaxllm.engine.memory``), and
        speculative decoding's settings."""
        lines = startup_report(self.model.config, self.policy, self.plan,
                               weights_bytes_per_device(self.model.params), self.model.mesh,
                               params=self.model.params)
        if self.images is not None:
            lines.append(self.images.describe())
        return lines + ([self.speculator.describe()] if self.speculator is not None else [])

    def recover(self, failed: Sequence[Request] = ()) -> int:
        """Restores a consistent state after a failed step, whose cache is lost: ``failed``
        are finished ("error"); every other request is requeued, to be recomputed from its
        tokens; every page is free, the prefix cache empty, the KV cache re-created. Returns
        how many running requests were preempted; raises RecoveryFailed if it cannot."""
        self._in_flight, self._last_slot = None, {}
        for request in failed:
            request.pages = []  # reclaimed with every other page below
            self.scheduler.finish(request, "error")
            self.requests.pop(request.request_id, None)
        preempted = self.scheduler.requeue(self.requests.values())
        self.pages.reset()
        try:
            self.executor.reset_cache()
        except Exception as error:
            raise RecoveryFailed(f"cannot re-create the KV cache ({type(error).__name__}: "
                                 f"{error})") from error
        return preempted

    def warmup(self, progress: bool = True) -> int:
        """Compiles the step program for every (token bucket, batch bucket) pair, so serving
        never compiles, and the verifying one for every pair a step with drafts can have;
        with a vision tower also each plain one's variant with image features (a step that
        takes image features verifies no drafts) and the encoder for every tile bucket.
        Returns how many. Writes only into pages no request holds."""
        from tqdm import tqdm

        policy, page = self.policy, self.policy.page_size
        if self.pages.num_free != self.pages.num_pages:
            raise RuntimeError("warm up before submitting requests")

        def plans(rows: int, seqs: int, num_drafts: int = 0) -> list[SlotPlan]:
            last = rows - (seqs - 1)  # one token each, the rest to the last sequence
            # Free pages, given to every group at once (warm-up output is never read).
            groups = self.groups.num_groups
            pieces = [SeqPiece([[1]] * groups, 0, [0]) for _ in range(seqs - 1)]
            pieces.append(SeqPiece([list(range(1, 1 + pages_for(last, page)))] * groups, 0,
                                   [0] * last))
            # Padding rows of the persistent batch: greedy, never written.
            out = plans_for(pieces, [self.batch.pad_row] * seqs)
            out[-1] = dataclasses.replace(out[-1], num_drafts=min(num_drafts, last - 1))
            return out

        shapes = policy.step_shapes()
        runs = [plans(rows, seqs) for rows, seqs in shapes]
        if self.speculator is not None:
            # A step with drafts has a piece of 2 rows or more: with all its sequences, or
            # with one fewer where that leaves its batch bucket the same.
            for rows, seqs in shapes:
                n = seqs if rows > seqs else seqs - 1
                if n >= 1 and policy.batch_bucket(n) == seqs:
                    runs.append(plans(rows, n, self.speculator.k))
        compiled = 0
        if self.images is not None:
            compiled += self.images.warmup()
            # Image rows of none of the step's tokens: the variant's shapes are what counts.
            width = self.model.config.hidden_size
            none = PieceImages(np.zeros(0, np.int32), np.zeros((1, width), self.model.dtype))
            runs += [[dataclasses.replace(p, images=dataclasses.replace(
                none, rows=np.full(len(p.piece.tokens), -1, np.int32))) for p in run]
                for run in runs if not any(p.num_drafts for p in run)]  # (_takes_images)
        for run in tqdm(runs, desc="warmup", unit="program", disable=not progress):
            self.executor.run(self.batch.inputs(run)).result()
        return compiled + len(runs)

    def generate(self, prompts: Sequence[Sequence[int]],
                 sampling: SamplingParams | None = None) -> list[list[int]]:
        """Runs ``prompts`` to completion through the engine (for tests and offline use)."""
        ids = [self.add_request(p, sampling) for p in prompts]
        produced: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_unfinished():
            for out in self.step():
                produced[out.request_id] += out.new_token_ids
        return [produced[i] for i in ids]


class PickedLogprobs(Sequence):
    """A sequence slot's emitted tokens in a step's picks as ``TokenLogprob``s, built only
    when read (most requests never ask for log-probabilities): one token, or a verifying
    step's accepted drafts and the token after them."""

    __slots__ = ("_picked", "_slot", "_n")

    def __init__(self, picked: Sampled | Emitted, slot: int, n: int):
        self._picked, self._slot, self._n = picked, slot, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(self._n))]
        if index < 0:
            index += self._n
        if not 0 <= index < self._n:
            raise IndexError(index)
        p, i = self._picked, self._slot
        at = (i, index) if isinstance(p, Emitted) else (i,)
        token = int(p.tokens[at])
        return TokenLogprob(token, float(p.logprobs[at]),
                            TopLogprobs(p.top_ids[at], p.top_logprobs[at]))

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


def _prompt_targets(s: Scheduled) -> list[int]:
    """Per row of a scheduled piece: the prompt token that follows it when its request scores
    its prompt (``prompt_logprobs``), else -1; empty when it scores nothing."""
    request = s.request
    if request.sampling.prompt_logprobs is None:
        return []
    n = len(request.prompt)
    return [request.prompt[p + 1] if p + 1 < n else -1
            for p in range(s.start, s.start + s.num_tokens)]


def _record_prompt_scores(s: Scheduled, scored: Scored, first_row: int) -> None:
    """Appends the scores of the prompt tokens this chunk predicted; a chunk recomputed after
    a preemption adds nothing it already had."""
    request = s.request
    if request.sampling.prompt_logprobs is None:
        return
    for k in range(s.num_tokens):
        index = s.start + k + 1  # the prompt token row k predicts
        if index >= len(request.prompt) or index <= len(request.scored_prompt):
            continue
        r = first_row + k
        request.scored_prompt.append(TokenLogprob(
            request.prompt[index], float(scored.logprobs[r]),
            list(zip(scored.top_ids[r].tolist(), scored.top_logprobs[r].tolist(),
                     strict=True))))

