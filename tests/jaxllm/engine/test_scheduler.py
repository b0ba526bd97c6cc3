"""The scheduler's decisions: budgets, order, chunked prefill, preemption, prefix-cache admission.

Runs the real scheduler over a real page allocator; no model. Expected values are written out
from the rules in the scheduler's docstring, never computed with the code under test.
"""

from __future__ import annotations

from jaxllm.buckets import BucketPolicy
from jaxllm.engine.pages import PageAllocator
from jaxllm.engine.request import Request, Status
from jaxllm.engine.scheduler import Scheduler
from jaxllm.kv_cache import CacheConfig
from jaxllm.sample.sampling import SamplingParams


def _scheduler(*, page_size: int = 4, num_pages: int = 32, max_num_seqs: int = 4,
               max_num_batched_tokens: int = 64, max_model_len: int = 64) -> Scheduler:
    policy = BucketPolicy(max_model_len=max_model_len,
                          cache=CacheConfig(page_size=page_size, num_pages=num_pages),
                          max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens)
    return Scheduler(policy, PageAllocator(policy.cache))


def _request(rid: str, prompt: list[int], max_tokens: int = 8) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, seed=0))


def _step(scheduler: Scheduler, token: int = 1) -> list[tuple[str, int, bool]]:
    """Schedules and 'runs' one step: each sampling row appends ``token``."""
    scheduled = scheduler.schedule()
    for s in scheduled:
        scheduler.settle(s)
        if s.samples:
            s.request.num_in_flight -= 1
            s.request.output.append(token)
            if len(s.request.output) >= s.request.max_tokens:
                scheduler.finish(s.request, "length")
    return [(s.request.request_id, s.num_tokens, s.samples) for s in scheduled]


def test_sequence_budget_is_respected():
    sched = _scheduler(max_num_seqs=2)
    for i in range(3):
        sched.add(_request(f"r{i}", [10 * i + j for j in range(4)]))
    assert _step(sched) == [("r0", 4, True), ("r1", 4, True)]
    assert [r.request_id for r in sched.waiting] == ["r2"]
    assert [r.request_id for r in sched.running] == ["r0", "r1"]


def test_token_budget_splits_the_last_admitted_prompt():
    sched = _scheduler(max_num_batched_tokens=6)
    sched.add(_request("a", [1, 2, 3, 4]))
    sched.add(_request("b", [5, 6, 7, 8]))
    sched.add(_request("c", [9]))
    # a whole (4), b gets the remaining 2 rows and does not sample; c does not fit at all.
    assert _step(sched) == [("a", 4, True), ("b", 2, False)]
    assert [r.request_id for r in sched.waiting] == ["c"]
    # a decodes one row; b finishes its prompt (2) and samples; c fits in what is left.
    assert _step(sched) == [("a", 1, True), ("b", 2, True), ("c", 1, True)]


def test_running_requests_go_before_waiting_ones():
    sched = _scheduler(max_num_batched_tokens=5)
    sched.add(_request("old", [1, 2, 3, 4]))
    _step(sched)
    sched.add(_request("new", list(range(20, 28))))
    # The running request decodes first; the newcomer gets what remains of the budget.
    assert _step(sched) == [("old", 1, True), ("new", 4, False)]


def test_chunked_prefill_runs_a_long_prompt_in_budget_sized_chunks():
    sched = _scheduler(page_size=4, max_num_batched_tokens=4)
    request = _request("long", list(range(100, 110)), max_tokens=2)
    sched.add(request)
    seen = []
    for _ in range(3):
        seen += _step(sched)
        seen.append((request.num_computed, len(request.held_pages)))
    assert seen == [("long", 4, False), (4, 1),
                    ("long", 4, False), (8, 2),
                    ("long", 2, True), (10, 3)]
    assert request.output == [1]
    assert _step(sched) == [("long", 1, True)]  # decode: the sampled token
    assert request.status is Status.FINISHED and request.finish_reason == "length"


def test_budget_used_up_by_running_requests_admits_nobody():
    sched = _scheduler(max_num_batched_tokens=4)
    sched.add(_request("a", list(range(12))))
    sched.add(_request("b", [50]))
    assert _step(sched) == [("a", 4, False)]
    assert _step(sched) == [("a", 4, False)]
    assert [r.request_id for r in sched.waiting] == ["b"]
    assert sched.pages.num_free == 32 - 2


def test_preemption_evicts_the_most_recently_admitted():
    # Three one-page prompts fill three of four pages; each decode needs a second page.
    sched = _scheduler(page_size=4, num_pages=4)
    a, b, c = (_request(n, [k, k + 1, k + 2, k + 3]) for n, k in (("a", 0), ("b", 10), ("c", 20)))
    for r in (a, b, c):
        sched.add(r)
    assert _step(sched, token=7) == [("a", 4, True), ("b", 4, True), ("c", 4, True)]
    assert sched.pages.num_free == 1
    # a takes the free page; b needs one more, so c (admitted last) is preempted.
    assert _step(sched) == [("a", 1, True), ("b", 1, True)]
    assert sched.num_preemptions == 1
    assert [r.request_id for r in sched.running] == ["a", "b"]
    assert list(sched.waiting) == [c]
    assert c.status is Status.WAITING and c.pages == [] and c.num_computed == 0
    assert c.output == [7]  # its generated token is kept and recomputed later
    assert len(a.held_pages) == len(b.held_pages) == 2 and sched.pages.num_free == 0


def test_a_request_with_nothing_later_to_evict_preempts_itself():
    sched = _scheduler(page_size=4, num_pages=3)
    a, b, c = (_request(n, [k, k + 1, k + 2, k + 3]) for n, k in (("a", 0), ("b", 10), ("c", 20)))
    for r in (a, b, c):
        sched.add(r)
    _step(sched)
    # a evicts c and takes its page; b finds no unscheduled later request, so it steps aside.
    assert _step(sched) == [("a", 1, True)]
    assert sched.num_preemptions == 2
    assert list(sched.waiting) == [b, c]  # the older preempted request is retried first
    assert b.pages == [] and c.pages == [] and sched.pages.num_free == 1


def test_waiting_request_that_does_not_fit_takes_no_pages_and_blocks_later_ones():
    sched = _scheduler(page_size=4, num_pages=4)
    sched.add(_request("holder", list(range(12))))
    _step(sched)  # 3 pages held
    sched.add(_request("big", list(range(50, 58))))  # needs 2 pages
    sched.add(_request("small", [99]))  # would fit, but arrived later
    assert _step(sched) == [("holder", 1, True)]  # grows into the 4th page
    assert [r.request_id for r in sched.waiting] == ["big", "small"]
    assert sched.waiting[0].pages == [] and sched.waiting[0].num_computed == 0


def test_prefix_cache_admission_starts_from_cached_pages():
    sched = _scheduler(page_size=4, num_pages=16)
    first = _request("first", list(range(10)), max_tokens=1)
    sched.add(first)
    _step(sched)  # 10 tokens: pages 1 and 2 are full and registered; then finished
    assert first.status is Status.FINISHED and sched.pages.num_free == 16
    second = _request("second", list(range(8)) + [77, 78, 79])
    sched.add(second)
    assert _step(sched) == [("second", 3, True)]  # only the 3 uncached tokens run
    assert second.num_cached_prompt == 8
    assert second.pages[0][:2] == [1, 2]  # the first request's two full pages
    assert second.num_computed == 11


def test_fully_cached_prompt_still_computes_its_last_token():
    sched = _scheduler(page_size=4, num_pages=16)
    sched.add(_request("first", list(range(12)), max_tokens=1))
    _step(sched)  # three full pages cached
    # Same 9 tokens: 2 full pages usable, and the 9th token runs to give logits.
    nine = _request("nine", list(range(9)))
    sched.add(nine)
    assert _step(sched) == [("nine", 1, True)]
    assert nine.num_cached_prompt == 8
    # Same 8 tokens: the second page holds the last token, so only the first page is used.
    eight = _request("eight", list(range(8)))
    sched.add(eight)
    assert _step(sched)[-1] == ("eight", 4, True)
    assert eight.num_cached_prompt == 4


def test_cached_pages_taken_for_a_request_that_does_not_fit_are_given_back():
    sched = _scheduler(page_size=4, num_pages=5)
    sched.add(_request("first", list(range(8)), max_tokens=1))
    _step(sched)  # two cached pages, all five free
    holder = _request("holder", list(range(40, 46)))
    sched.add(holder)
    _step(sched)  # holder takes two uncached pages; three free, two of them cached
    late = _request("late", list(range(8)) + list(range(60, 70)))  # 2 cached + 3 new pages
    sched.add(late)
    assert _step(sched) == [("holder", 1, True)]
    assert list(sched.waiting) == [late] and late.pages == [] and late.num_computed == 0
    assert sched.pages.num_free == 3
    sched.finish(holder, "abort")
    # The cached pages kept their contents: late now starts after them.
    assert _step(sched) == [("late", 10, True)]
    assert late.pages[0][:2] == [1, 2]


def test_finish_releases_pages_of_running_and_waiting_requests():
    sched = _scheduler(page_size=4, num_pages=8, max_num_seqs=1)
    running = _request("running", list(range(9)))
    waiting = _request("waiting", [1, 2])
    sched.add(running)
    sched.add(waiting)
    _step(sched)
    assert sched.pages.num_free == 8 - 3 and sched.has_work()
    sched.finish(running, "abort")
    assert running.status is Status.FINISHED and running.finish_reason == "abort"
    assert running.pages == [] and sched.pages.num_free == 8 and running not in sched.running
    sched.finish(waiting, "abort")
    assert not sched.waiting and not sched.has_work()


def test_a_chunked_group_gives_back_pages_behind_its_chunk():
    """Group 0 global, group 1 chunked (chunk 8 = 2 pages of 4). A 20-token prompt runs in
    steps of 6 tokens: after each step group 1 holds only pages from the current chunk's
    start, and the pool gets the rest back."""
    policy = BucketPolicy(max_model_len=64, cache=CacheConfig(page_size=4, num_pages=32),
                          max_num_seqs=4, max_num_batched_tokens=6)
    sched = Scheduler(policy, PageAllocator(policy.cache, group_chunk=(None, 8)))
    request = _request("r", list(range(100, 120)), max_tokens=4)
    sched.add(request)
    held = []
    for _ in range(4):  # computed: 6, 12, 18, 20 tokens
        _step(sched)
        global_row, local_row = request.pages
        held.append((len(global_row), [p != 0 for p in local_row].count(True),
                     local_row.count(0)))
        assert sched.pages_held_by_group() == [len(global_row), len(local_row)
                                               - local_row.count(0)]
    # (global pages, live chunked pages, null entries): chunk starts 0, 8, 16, 16.
    assert held == [(2, 2, 0), (3, 1, 2), (5, 1, 4), (5, 1, 4)]
    assert sched.pages.num_free == 32 - 5 - 1
    sched.finish(request, "abort")
    assert sched.pages.num_free == 32


def test_a_recomputed_half_page_is_never_offered_to_the_prefix_cache():
    """After a preemption a request still knows the hashes of all six pages it had; while it
    recomputes, a page that is only half written again must not be registered under them
    (a later prefix hit would read its unwritten half)."""
    sched = _scheduler(page_size=4, num_pages=32, max_num_batched_tokens=24)
    request = _request("r", list(range(100, 125)))
    sched.add(request)
    _step(sched)  # 24 of 25 prompt tokens: six full pages
    assert len(request.page_hashes) == 6
    sched._preempt(request)
    # Everything it had is cached and free: re-admission takes the five pages of its first
    # 24 tokens it may reuse back (the last token always runs), so recompute from scratch.
    sched.pages.allocate(sched.pages.num_free)  # forgets every cached page
    sched.pages = PageAllocator(sched.pages.cache)
    sched.policy = BucketPolicy(max_model_len=64, cache=sched.pages.cache, max_num_seqs=4,
                                max_num_batched_tokens=10)
    _step(sched)  # tokens 0..9: pages 0, 1 full, page 2 half written
    row = request.pages[0]
    assert request.num_computed == 10 and len(row) == 3
    assert row[2] not in sched.pages.hash_of
    assert [sched.pages.hash_of[p][1] for p in row[:2]] == request.page_hashes[:2]


def test_token_array_follows_the_tokens_as_they_grow():
    """``Request.token_array`` (n-gram drafting's view of a sequence) equals prompt + output
    after each accepted token, across its buffer's growth, and cannot be written through."""
    import numpy as np

    request = Request("r", list(range(100, 150)), SamplingParams(max_tokens=200))
    for token in range(300):
        view = request.token_array()
        np.testing.assert_array_equal(view, np.asarray(request.prompt + request.output))
        assert view.dtype == np.int32 and not view.flags.writeable
        request.output.append(token % 7)
    assert request._array.shape[0] < 2 * request.num_tokens + 64
