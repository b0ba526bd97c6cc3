"""The scheduler: decides which tokens of which requests run in the next step. Nothing else.

Each step has a token budget (``max_num_batched_tokens``) and a sequence budget
(``max_num_seqs``). Running requests go first (a decode row each, or their next prefill
chunk); waiting requests are admitted after, oldest first, each starting from its longest
cached prefix. When pages run out, the most recently admitted running request is preempted:
its pages are released and it is recomputed later (its generated tokens are kept).

A request holds a table row of pages per layer group; a chunked group's row gives back the
pages before the current chunk as the request moves past them (``NULL_PAGE`` takes their
place), so a long sequence holds only a chunk's worth of pages in those groups.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np

from jaxllm.buckets import BucketPolicy
from jaxllm.engine.pages import PageAllocator, PageRow, extend_page_hashes
from jaxllm.engine.request import Request, Status
from jaxllm.kv_cache import NULL_PAGE
from jaxllm.layout import first_needed_page, pages_for


@dataclasses.dataclass(slots=True)  # not frozen: built for every sequence of every step
class Scheduled:
    """A request's piece of a step: tokens ``start : start + num_tokens`` (never changed
    once built: ``speculate`` makes a new one)."""

    request: Request
    num_tokens: int
    samples: bool  # the piece reaches the end of the request's tokens: pick the next one
    start: int
    epoch: int  # the request's epoch when scheduled (``Request.epoch``)
    admitted: bool  # it took its batch row in this step
    drafts: tuple[int, ...] = ()  # the piece's last tokens: drafts to verify (``speculate``)


def _scheduled(request: Request, n: int, pending: int, admitted: bool = False) -> Scheduled:
    """Schedules ``n`` of the request's ``pending`` tokens and counts them as computed
    (their keys and values are written by the step, which the device runs before any later
    one)."""
    samples = n == pending
    out = Scheduled(request, n, samples, request.num_computed, request.epoch, admitted)
    request.num_computed += n
    if samples:
        request.num_in_flight += 1
    return out


class Scheduler:
    def __init__(self, policy: BucketPolicy, pages: PageAllocator):
        self.policy, self.pages = policy, pages
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # Attention chunks that do not start on a page boundary: leaving one behind can
        # happen without filling a page (``settle``'s fast path).
        self._odd_chunks = tuple({c for c in pages.group_chunk
                                  if c is not None and c % pages.page_size})
        # Batch rows (``jaxllm.engine.batch``): at most max_num_seqs requests run.
        self.free_rows = list(range(policy.max_num_seqs - 1, -1, -1))
        # Images (``jaxllm.multimodal.feeder.ImageFeeder``): ``fit(request, start, n)`` says
        # how many of a piece's tokens may run (its images encoded and held), ``release``
        # lets a request's images go when its pages do.
        self.images = None

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        budget, max_seqs = self.policy.max_num_batched_tokens, self.policy.max_num_seqs
        page = self.pages.page_size
        out: list[Scheduled] = []
        for request in list(self.running):  # the hot loop: every running sequence, every step
            if budget == 0 or len(out) == max_seqs:
                break
            if request.status is not Status.RUNNING:  # preempted by an earlier request
                continue
            pending = request.num_pending
            if not _schedulable(request, pending):
                continue
            n = self._fit(request, min(pending, budget))
            # Pages to hold them already (most decode steps), else grown, preempting.
            pages = request.pages
            if n == 0 or ((not pages or request.num_computed + n > len(pages[0]) * page)
                          and not self._reserve(request, n, out)):
                continue
            out.append(_scheduled(request, n, pending))
            budget -= n
        # At most max_num_seqs requests run: one batch row each.
        while self.waiting and budget and len(out) < self.policy.max_num_seqs and self.free_rows:
            request = self.waiting[0]
            if request.num_in_flight:  # preempted while a step picks its next token
                break
            if not request.pages:
                self._take_cached_prefix(request)
            n = self._fit(request, min(request.num_pending, budget))
            if n == 0 or not self._grow(request, n):
                self._drop_pages(request)  # retry whole when pages are free again
                break
            self.waiting.popleft()
            request.batch_row = self.free_rows.pop()
            request.status = Status.RUNNING
            if request.first_scheduled_at is None:
                request.first_scheduled_at = time.monotonic()
            self.running.append(request)
            out.append(_scheduled(request, n, request.num_pending, admitted=True))
            budget -= n
        return out

    def _fit(self, request: Request, n: int) -> int:
        """``n``, or fewer when an image the piece reaches has no room in the encoder cache."""
        if self.images is None or request.images is None:
            return n
        return self.images.fit(request, request.num_computed, n)

    def speculate(self, scheduled: Scheduled, drafts: Sequence[int]) -> Scheduled:
        """A decode piece with ``drafts`` after its token, counted as computed like it, when
        the request's pages can grow to hold them without preempting anyone; else the piece
        unchanged. The engine rolls back what verification rejects (``settle``'s ``end``)."""
        request = scheduled.request
        if not drafts or scheduled.drafts or not scheduled.samples:
            return scheduled
        if not self._grow(request, len(drafts)):
            return scheduled
        request.num_computed += len(drafts)
        return dataclasses.replace(scheduled, num_tokens=scheduled.num_tokens + len(drafts),
                                   drafts=tuple(int(t) for t in drafts))

    def pages_held_by_group(self) -> list[int]:
        """Pages each layer group holds for running requests (prefix-cache pages that no
        request holds are free)."""
        # O(1) per request, not a scan of a 1M-token table every step: a row's null entries
        # are exactly the pages before its chunk's first needed one (``settle`` drops them
        # after every step; admission starts there); every group's row is as long as the
        # others (``_grow``).
        rows = [(len(r.pages[0]), r.num_computed) for r in self.running if r.pages]
        if not rows:
            return [0] * self.pages.num_groups
        lengths, computed = np.array(rows, np.int64).T
        page = self.pages.page_size
        held = []
        for chunk in self.pages.group_chunk:
            first = 0 if chunk is None else computed // chunk * chunk // page
            held.append(int(np.sum(lengths - first)))
        return held

    def finish(self, request: Request, reason: str) -> None:
        request.status, request.finish_reason = Status.FINISHED, reason
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._drop_pages(request)

    def _drop_pages(self, request: Request) -> None:
        """Gives back the request's pages and batch row: it starts again from nothing."""
        self.pages.release(request.held_pages)
        if self.images is not None:
            self.images.release(request)
        request.pages, request.num_computed = [], 0
        request.epoch += 1
        if request.batch_row is not None:
            self.free_rows.append(request.batch_row)
            request.batch_row = None

    def requeue(self, requests: Iterable[Request]) -> int:
        """Queues ``requests`` afresh, in order, each waiting with no pages and nothing
        computed: the cache they were computed in is gone, so they are recomputed from their
        tokens (outputs kept). Returns how many were running (each a preemption)."""
        requests = list(requests)
        preempted = sum(r.status is Status.RUNNING for r in requests)
        self.num_preemptions += preempted
        for request in requests:
            if self.images is not None:
                self.images.release(request)
            request.pages, request.num_computed, request.status = [], 0, Status.WAITING
            request.batch_row, request.num_in_flight = None, 0
            request.epoch += 1
        self.running, self.waiting = [], deque(requests)
        self.free_rows = list(range(self.policy.max_num_seqs - 1, -1, -1))
        return preempted

    def _take_cached_prefix(self, request: Request) -> None:
        # Cached rows would never be scored, nor recorded in a penalty slot (prompt tokens
        # count for repetition_penalty): such requests compute the whole prompt.
        if request.sampling.prompt_logprobs is not None or request.sampling.has_penalties:
            return
        # At least the last token is computed, so the step yields logits for it.
        usable = request.tokens[: len(request.tokens) - 1]
        spans = request.images.spans if request.images is not None else ()
        request.pages = [PageRow(row) for row in self.pages.match_prefix(usable, spans)]
        request.num_computed = len(request.pages[0]) * self.pages.page_size
        if request.num_cached_prompt == 0 and not request.output:
            request.num_cached_prompt = request.num_computed

    def _reserve(self, request: Request, n: int, scheduled: list[Scheduled]) -> bool:
        """Pages for ``n`` more tokens of a running request, preempting later ones if needed."""
        while not self._grow(request, n):
            victims = [r for r in self.running if r is not request
                       and all(s.request is not r for s in scheduled)]
            if not victims:
                self._preempt(request)
                return False
            self._preempt(victims[-1])
        return True

    def _grow(self, request: Request, n: int) -> bool:
        """Pages for ``n`` more tokens in every group, all or none."""
        if not request.pages:
            request.pages = [PageRow() for _ in range(self.pages.num_groups)]
        total = pages_for(request.num_computed + n, self.pages.page_size)
        if len(request.pages[0]) >= total:  # every group's row grows with the others
            return True
        need = [max(0, total - len(row)) for row in request.pages]
        fresh = self.pages.allocate(sum(need))
        if fresh is None:
            return False
        for row, k in zip(request.pages, need, strict=True):
            row += fresh[:k]
            fresh = fresh[k:]
        return True

    def _preempt(self, request: Request) -> None:
        self.num_preemptions += 1
        self.running.remove(request)
        self._drop_pages(request)
        request.status = Status.WAITING
        self.waiting.appendleft(request)

    def settle(self, scheduled: Scheduled, end: int | None = None) -> None:
        """After its step ran: offers the piece's now-full pages to the prefix cache and gives
        back the pages a chunked group's attention chunk has left behind, up to ``end``: the
        piece's end, or where its committed tokens end when verification rejected drafts
        (their slots are never read, nor offered). Nothing for a request whose pages were
        dropped since it was scheduled (finished, preempted)."""
        request, page = scheduled.request, self.pages.page_size
        before = scheduled.start
        if end is None:
            end = before + scheduled.num_tokens
        old_full, full = before // page, end // page
        known = len(request.page_hashes) * page
        if full == old_full and end - known < page and not (self._odd_chunks and any(
                before // c != end // c for c in self._odd_chunks)):
            # Most decode steps (checked first: it is the hot path): no page filled, no page
            # to hash, no attention chunk left behind.
            return
        if request.epoch != scheduled.epoch or request.status is not Status.RUNNING:
            return
        # Hashes depend on tokens only, so they survive preemption; only new pages hash, from
        # their own tokens (work per step independent of the context's length).
        if end - known >= page:
            extend_page_hashes(request.page_hashes, request.tokens_between(known, end), page,
                               request.images.spans if request.images is not None else ())
        # After a preemption the request may know more hashes than it has recomputed pages:
        # only pages that are full now may be offered (a half-written one must never be);
        # those full before this piece were offered when they filled.
        for group, row in enumerate(request.pages):
            self.pages.register(group, row[old_full:full],
                                request.page_hashes[old_full:full])
            # A chunked group gives back the pages its chunk has left behind (those before
            # the previous chunk start are null already).
            chunk = self.pages.group_chunk[group]
            old_first = first_needed_page(before, page, chunk)
            first = first_needed_page(end, page, chunk)
            dropped = [p for p in row[old_first:first] if p != NULL_PAGE]
            if dropped:
                self.pages.release(dropped)
            row[old_first:first] = [NULL_PAGE] * (first - old_first)


def _schedulable(request: Request, pending: int) -> bool:
    """Whether a running request has a token to run now: not while its only pending token
    is one a step still picks for it that cannot be followed (it reached max_tokens), nor
    while that token is unknown and its grammar needs it for the next mask."""
    if pending == 0:
        return False
    if request.num_in_flight:
        return request.may_continue and request.matcher is None
    return True
