"""Page allocation, reference counts, the null page and the per-group prefix cache."""

import numpy as np
import pytest

from jaxllm.engine.pages import PageAllocator, page_hashes
from jaxllm.kv_cache import NULL_PAGE, CacheConfig


def test_allocate_release_and_exhaustion():
    pages = PageAllocator(CacheConfig(page_size=2, num_pages=4))
    a = pages.allocate(3)
    assert sorted(a) == [1, 2, 3] and pages.num_free == 1  # page 0 is never handed out
    assert pages.allocate(2) is None and pages.num_free == 1  # nothing taken on failure
    pages.release(a + [NULL_PAGE])  # the null page is ignored
    assert pages.num_free == 4
    with pytest.raises(RuntimeError, match="released more often"):
        pages.release([a[0]])


def test_chained_hashes_depend_on_the_whole_prefix():
    a = page_hashes([1, 2, 3, 4, 5], 2)
    b = page_hashes([9, 9, 3, 4], 2)
    assert len(a) == 2 and len(b) == 2  # only full pages
    assert a[1] != b[1]  # same page tokens, different prefix


def test_prefix_is_shared_and_survives_release_until_reused():
    pages = PageAllocator(CacheConfig(page_size=2, num_pages=6))
    tokens = [1, 2, 3, 4, 5, 6, 7]
    first = pages.allocate(4)
    pages.register(0, first, page_hashes(tokens, 2))  # three full pages
    assert pages.match_prefix([1, 2, 3, 4, 9, 9]) == [first[:2]]
    assert pages.refs[first[0]] == 2
    pages.release(first[:2])
    pages.release(first)
    assert pages.num_free == 6
    assert pages.match_prefix(tokens) == [first[:3]]  # freed but still cached
    pages.release(first[:3])
    taken = pages.allocate(6)  # hands out every page: the cached ones are forgotten
    assert len(taken) == 6 and pages.match_prefix(tokens) == [[]]


def test_prefix_of_a_chunked_group_needs_only_its_last_chunk():
    """Group 0 global, group 1 chunked (chunk 4 tokens = 2 pages of 2). A 5-page prefix
    resumes at position 10: group 1 needs pages 4 (positions 8, 9) only."""
    pages = PageAllocator(CacheConfig(page_size=2, num_pages=20), group_chunk=(None, 4))
    tokens = list(range(1, 12))
    hashes = page_hashes(tokens, 2)
    global_row = pages.allocate(5)
    pages.register(0, global_row, hashes)
    local_row = [NULL_PAGE] * 4 + pages.allocate(1)  # pages 0-3 were dropped
    pages.register(1, local_row, hashes)
    assert pages.match_prefix(tokens) == [global_row, local_row]


@pytest.mark.parametrize("local_pages, resumes_at", [
    ([3, 4], 5),  # the whole window of position 10 (chunk 6..11) is cached
    ([3], 4),  # page 4 missing: resume at position 8, whose window (6, 7) is page 3
    ([4], 3),  # page 3 missing: resume at position 6, a chunk start: an empty window
    ([], 3),
])
def test_prefix_shrinks_until_every_chunked_window_is_cached(local_pages, resumes_at):
    """Group 1 has a 6-token chunk (3 pages of 2); the global group caches 5 pages."""
    pages = PageAllocator(CacheConfig(page_size=2, num_pages=20), group_chunk=(None, 6))
    tokens = list(range(1, 12))
    hashes = page_hashes(tokens, 2)
    global_row = pages.allocate(5)
    pages.register(0, global_row, hashes)
    local_row = [NULL_PAGE] * 5
    for j in local_pages:
        local_row[j] = pages.allocate(1)[0]
    pages.register(1, local_row, hashes)
    got = pages.match_prefix(tokens)
    window_start = resumes_at * 2 // 6 * 6 // 2
    assert got == [global_row[:resumes_at],
                   [NULL_PAGE] * window_start + local_row[window_start:resumes_at]]


def test_page_row_reads_like_a_list_and_copies_as_an_array():
    from jaxllm.engine.pages import PageRow

    row, mirror = PageRow(), []
    for chunk in ([1, 2, 3], list(range(4, 40)), [], [41]):
        row += chunk
        mirror += chunk
    row[0:2] = [0, 0]
    mirror[0:2] = [0, 0]
    assert row == mirror and len(row) == len(mirror) and list(row) == mirror
    assert row[3:6] == mirror[3:6] and row[-1] == 41 and row.count(0) == 2
    table = np.zeros(64, np.int32)
    table[: len(row)] = row  # a block-table row is a copy, not a conversion
    assert table[: len(row)].tolist() == mirror
    assert row.array.dtype == np.int32 and np.asarray(row, np.int64).tolist() == mirror


def test_page_hashes_include_the_images_under_their_tokens():
    tokens = list(range(100, 140))  # 5 pages of 8
    a, b = b"image-a", b"image-b"

    def span(image: bytes) -> list[tuple[int, int, bytes]]:
        return [(10, 12, image)]  # positions 10..21: pages 1 and 2
    plain = page_hashes(tokens, 8)
    with_a = page_hashes(tokens, 8, images=span(a))
    assert with_a == page_hashes(tokens, 8, images=span(a))  # the same image shares pages
    with_b = page_hashes(tokens, 8, images=span(b))
    assert with_a[0] == with_b[0] == plain[0]  # page 0 ends before the image
    assert all(x != y for x, y in zip(with_a[1:], with_b[1:], strict=True))  # 1-2, then chained
    assert all(x != y for x, y in zip(with_a[1:], plain[1:], strict=True))
    # A span that ends exactly where page 1 starts touches page 0 only.
    edge = page_hashes(tokens, 8, images=[(2, 6, b"x")])
    assert edge[0] != plain[0]
    assert page_hashes(tokens[:16], 8, images=[(16, 8, b"x")]) == plain[:2]
    # Extending page by page gives the same hashes as hashing the whole sequence at once.
    grown: list[bytes] = []
    for end in (8, 20, 40):
        grown = page_hashes(tokens[:end], 8, known=grown, images=span(a))
    assert grown == with_a
