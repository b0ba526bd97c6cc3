"""The engine: requests in, tokens out, one scheduled step at a time."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from jaxllm.api import Model
from jaxllm.engine.executor import Executor, agree_on_minimum
from jaxllm.engine.faults import RecoveryFailed, StepFailed
from jaxllm.engine.memory import (
    pages_for_sequence,
    plan_for_model,
    startup_report,
    weights_bytes_per_device,
)
from jaxllm.engine.pages import PageAllocator
from jaxllm.engine.runner import ModelRunner, Scored, step_temp_bytes
from jaxllm.engine.scheduler import Request, Scheduled, Scheduler
from jaxllm.layout import SeqChunk, check_token_ids, pages_for
from jaxllm.penalties import SeqPenalty
from jaxllm.sampling import MAX_MIN_TOKENS_STOP_IDS, SamplingParams

if TYPE_CHECKING:
    from jaxllm.structured import GrammarCompiler

log = logging.getLogger("jaxllm.engine")


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens, best first


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: str | None  # "stop" (EOS or a stop id), "length", "abort"
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    num_output_tokens: int
    queued_seconds: float | None = None  # from admission check to the first scheduled step
    # With prompt_logprobs, on a request's first output: prompt tokens 1.. scored.
    prompt_logprobs: list[TokenLogprob] | None = None


class Engine:
    """Continuous batching over ``model``'s paged KV cache.

    The KV cache holds ``num_pages`` pages, or what ``kv_cache_memory_bytes`` holds, or the
    device's ``gpu_memory_utilization`` share after the weights and the step's temporaries
    (``jaxllm.engine.memory.plan_kv_cache``). Across processes every process builds the
    engine (the same plan: the smallest any process makes); process 0 steps it and the others
    ``executor.follow()`` (``jaxllm.engine.executor``), each step bounded by ``step_timeout``.
    """

    def __init__(self, model: Model, *, num_pages: int | None = None,
                 kv_cache_memory_bytes: int | None = None,
                 gpu_memory_utilization: float | None = None,
                 max_num_batched_tokens: int | None = None, seed: int | None = None,
                 step_timeout: float | None = None):
        self.model = model
        # The engine's configuration, derived once and handed whole to every part: the
        # model's, with its step width and a cache sized by the memory plan.
        base = model.bucket_policy
        if max_num_batched_tokens is not None:
            base = dataclasses.replace(base, max_num_batched_tokens=max_num_batched_tokens)
        groups = base.cache.groups(model.config)
        probe = base.for_engine(max(base.pages_per_seq,
                                    pages_for_sequence(base, groups, base.max_model_len)))
        self.plan = plan_for_model(
            model, base, lambda: step_temp_bytes(model, probe), num_pages=num_pages,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            gpu_memory_utilization=gpu_memory_utilization)
        if (agreed := agree_on_minimum(self.plan.num_pages)) != self.plan.num_pages:
            self.plan = plan_for_model(model, base, lambda: step_temp_bytes(model, probe),
                                       num_pages=agreed)
        self.policy = base.for_engine(self.plan.num_pages)
        self.groups = groups
        self.pages = PageAllocator(self.policy.cache, groups.group_chunk)
        self.scheduler = Scheduler(self.policy, self.pages)
        self.runner = ModelRunner(model, self.policy)
        self.executor = Executor(self.runner, step_timeout=step_timeout)
        self.requests: dict[str, Request] = {}
        # Compiles structured-output grammars against the tokenizer (set by whoever has one,
        # e.g. the server); requests with ``sampling.structured`` are refused without it.
        self.grammars: GrammarCompiler | None = None
        self._ids = itertools.count()
        # Seeds for requests that bring none: reproducible runs when the engine has a seed.
        self._seeds = random.Random(seed if seed is not None else secrets.randbits(64))

    def prepare(self, prompt: Sequence[int], sampling: SamplingParams | None = None,
                request_id: str | None = None, *, ignore_eos: bool = False) -> Request:
        """Checks a request and builds it, changing nothing: bad ids or lengths raise
        ValueError here, before any device work (safe to call from another thread)."""
        sampling = sampling or SamplingParams()
        ids = check_token_ids(list(prompt), self.model.config.vocab_size).tolist()
        if sampling.max_tokens is None:
            self.policy.check_request(len(ids), max(1, self.policy.max_model_len - len(ids)))
        max_tokens = (self.policy.max_model_len - len(ids) if sampling.max_tokens is None
                      else sampling.max_tokens)
        if max_tokens == 0:  # only scores the prompt
            self.policy.check_length(len(ids))
        else:
            self.policy.check_request(len(ids), max_tokens)
        stops = set(sampling.stop_token_ids) | (set() if ignore_eos
                                                 else set(self.model.eos_token_ids))
        check_token_ids(sorted(stops), self.model.config.vocab_size)
        check_token_ids([t for t, _ in sampling.logit_bias], self.model.config.vocab_size)
        if sampling.min_tokens and len(stops) > MAX_MIN_TOKENS_STOP_IDS:
            raise ValueError(f"min_tokens holds back at most {MAX_MIN_TOKENS_STOP_IDS} stop "
                             f"ids; this request has {len(stops)}")
        matcher = None
        if sampling.structured is not None:
            if self.grammars is None:
                raise ValueError("structured outputs need the model's tokenizer, and this "
                                 "engine has none")
            matcher = self.grammars.matcher(sampling.structured)
        request_id = request_id or f"req-{next(self._ids)}"
        seed = sampling.seed if sampling.seed is not None else self._seeds.getrandbits(63)
        return Request(request_id, ids, sampling, max_tokens, seed, frozenset(stops),
                       matcher=matcher)

    def submit(self, request: Request) -> str:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.scheduler.add(request)
        return request.request_id

    def add_request(self, prompt: Sequence[int], sampling: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Checks and queues a request; returns its id."""
        return self.submit(self.prepare(prompt, sampling, request_id))

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None and request.finish_reason is None:
            self.scheduler.finish(request, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[RequestOutput]:
        """Runs one scheduled step; returns what each touched request gained.

        A step that fails (anything raising in it, or non-finite logits) stops its own
        requests, recovers the engine (``recover``) and raises ``StepFailed``."""
        scheduled: list[Scheduled] = []
        try:
            scheduled = self.scheduler.schedule()
            if not scheduled:
                return []
            chunks = step_chunks(scheduled)
            args = (chunks, [s.request.sampling for s in scheduled],
                    [s.request.seed for s in scheduled], [len(s.request.output) for s in scheduled])
            stops = [s.request.stop_ids for s in scheduled]
            penalties = [None if s.request.penalty_slot is None
                         else SeqPenalty(s.request.penalty_slot, len(s.request.prompt))
                         for s in scheduled]
            masks = self._token_masks(scheduled)
            targets = _prompt_targets(scheduled)
            scored = None
            if any(t >= 0 for t in targets):
                picked, scored = self.executor.sample_and_score_step(*args, targets, stops,
                                                                     penalties, masks)
            else:
                picked = self.executor.sample_step(*args, stops, penalties, masks)
        except Exception as error:
            ids = [s.request.request_id for s in scheduled]
            log.error("engine step failed (%s: %s); stopping its requests %s",
                      type(error).__name__, error, ids, exc_info=error)
            preempted = self.recover([s.request for s in scheduled])
            log.warning("recovered: KV cache re-created, prefix cache emptied, every page free; "
                        "%d requests queued, %d of them preempted to be recomputed",
                        len(self.requests), preempted)
            raise StepFailed(ids, error) from error
        outputs = []
        row = 0
        for i, s in enumerate(scheduled):
            request, token = s.request, int(picked.tokens[i])
            if scored is not None:
                _record_prompt_scores(s, scored, row)
            row += s.num_tokens
            self.scheduler.computed(s)
            if not s.samples:
                continue  # a prefill chunk that has not reached the prompt's end
            if request.max_tokens == 0:  # the prompt is scored; nothing to generate
                self.scheduler.finish(request, "length")
                del self.requests[request.request_id]
                outputs.append(RequestOutput(
                    request.request_id, [], [], True, "length", len(request.prompt),
                    request.num_cached_prompt, 0, request.queued_seconds,
                    request.scored_prompt))
                continue
            if request.matcher is not None and not _advance(request.matcher, token):
                # The mask allowed only tokens the grammar accepts; a token outside it means
                # nothing was allowed (e.g. min_tokens holding back the only way to end).
                log.warning("request %s: token %d does not continue its grammar (%s); "
                            "stopping it", request.request_id, token,
                            request.matcher.get_error())
                self.scheduler.finish(request, "stop")
                del self.requests[request.request_id]
                outputs.append(RequestOutput(
                    request.request_id, [], [], True, "stop", len(request.prompt),
                    request.num_cached_prompt, len(request.output), request.queued_seconds))
                continue
            request.output.append(int(token))
            reason = None
            if token in request.stop_ids:
                reason = "stop"
            elif request.matcher is not None and request.matcher.is_stopped():
                reason = "stop"  # the grammar is complete: nothing but EOS could follow
            elif len(request.output) >= request.max_tokens:
                reason = "length"
            if reason:
                self.scheduler.finish(request, reason)
                del self.requests[request.request_id]
            logprob = TokenLogprob(token, float(picked.logprobs[i]), list(zip(
                picked.top_ids[i].tolist(), picked.top_logprobs[i].tolist(), strict=True)))
            outputs.append(RequestOutput(
                request.request_id, [token], [logprob], reason is not None, reason,
                len(request.prompt), request.num_cached_prompt, len(request.output),
                request.queued_seconds,
                request.scored_prompt if request.sampling.prompt_logprobs is not None
                and len(request.output) == 1 else None))
        return outputs

    def _token_masks(self, scheduled: Sequence[Scheduled]) -> dict[int, np.ndarray] | None:
        """The allowed tokens of each constrained sequence that picks a token this step
        (``jaxllm.structured``), keyed by its index in the step."""
        constrained = [(i, s.request.matcher) for i, s in enumerate(scheduled)
                       if s.samples and s.request.matcher is not None]
        if not constrained:
            return None
        assert self.grammars is not None  # a request has a matcher only through it
        masks = self.grammars.masks([m for _, m in constrained], self.runner.mask_words)
        return {i: masks[k] for k, (i, _) in enumerate(constrained)}

    def report(self) -> list[str]:
        """The start-up report: memory, pages, concurrency (``jaxllm.engine.memory``)."""
        return startup_report(self.model.config, self.policy, self.plan,
                              weights_bytes_per_device(self.model.params), self.model.mesh,
                              params=self.model.params)

    def recover(self, failed: Sequence[Request] = ()) -> int:
        """Restores a consistent state after a failed step, whose cache is lost: ``failed``
        are finished ("error"); every other request is requeued, to be recomputed from its
        tokens; every page is free, the prefix cache empty, the KV cache re-created. Returns
        how many running requests were preempted; raises RecoveryFailed if it cannot."""
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
        never compiles; returns how many. Writes only into pages no request holds."""
        from tqdm import tqdm

        policy, page = self.policy, self.policy.page_size
        if self.pages.num_free != self.pages.num_pages:
            raise RuntimeError("warm up before submitting requests")
        shapes = policy.step_shapes()
        for rows, seqs in tqdm(shapes, desc="warmup", unit="program", disable=not progress):
            last = rows - (seqs - 1)  # one token each, the rest to the last sequence
            # Free pages, given to every group at once (warm-up output is never read).
            groups = self.groups.num_groups
            chunks = [SeqChunk([[1]] * groups, 0, [0]) for _ in range(seqs - 1)]
            chunks.append(SeqChunk([list(range(1, 1 + pages_for(last, page)))] * groups, 0,
                                   [0] * last))
            self.executor.sample_step(chunks, [SamplingParams(temperature=0.0)] * seqs,
                                      seeds=[0] * seqs, steps=[0] * seqs)
        return len(shapes)

    def generate(self, prompts: Sequence[Sequence[int]],
                 sampling: SamplingParams | None = None) -> list[list[int]]:
        """Runs ``prompts`` to completion through the engine (for tests and offline use)."""
        ids = [self.add_request(p, sampling) for p in prompts]
        produced: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_unfinished():
            for out in self.step():
                produced[out.request_id] += out.new_token_ids
        return [produced[i] for i in ids]


def step_chunks(scheduled: Sequence[Scheduled]) -> list[SeqChunk]:
    """Each scheduled request's pages and the tokens it runs this step."""
    return [SeqChunk(s.request.pages, s.request.num_computed,
                     s.request.tokens_between(s.request.num_computed,
                                              s.request.num_computed + s.num_tokens))
            for s in scheduled]


def _advance(matcher, token: int) -> bool:
    """Feeds ``token`` to a request's grammar; False when the grammar refuses it (or the
    matcher fails: it must never take the engine thread down)."""
    try:
        return bool(matcher.consume_token(token))
    except Exception as error:  # noqa: BLE001 - reported, and the request is stopped
        log.error("grammar matcher failed on token %d: %s", token, error)
        return False


def _prompt_targets(scheduled: Sequence[Scheduled]) -> list[int]:
    """Per flat row of the step: the prompt token that follows it when its request scores its
    prompt (``prompt_logprobs``), else -1."""
    targets = []
    for s in scheduled:
        request, start = s.request, s.request.num_computed
        wants = request.sampling.prompt_logprobs is not None
        targets += [request.prompt[p + 1] if wants and p + 1 < len(request.prompt) else -1
                    for p in range(start, start + s.num_tokens)]
    return targets


def _record_prompt_scores(s: Scheduled, scored: Scored, first_row: int) -> None:
    """Appends the scores of the prompt tokens this chunk predicted; a chunk recomputed after
    a preemption adds nothing it already had."""
    request = s.request
    if request.sampling.prompt_logprobs is None:
        return
    for k in range(s.num_tokens):
        index = request.num_computed + k + 1  # the prompt token row k predicts
        if index >= len(request.prompt) or index <= len(request.scored_prompt):
            continue
        r = first_row + k
        request.scored_prompt.append(TokenLogprob(
            request.prompt[index], float(scored.logprobs[r]),
            list(zip(scored.top_ids[r].tolist(), scored.top_logprobs[r].tolist(),
                     strict=True))))

