"""Page allocation, reference counts and the prefix cache."""

import pytest

from jaxllm.engine.pages import PageAllocator, page_hashes
from jaxllm.kv_cache import CacheConfig


def test_allocate_release_and_exhaustion():
    pages = PageAllocator(CacheConfig(page_size=2, num_pages=4))
    a = pages.allocate(3)
    assert sorted(a) == [0, 1, 2] and pages.num_free == 1
    assert pages.allocate(2) is None and pages.num_free == 1  # nothing taken on failure
    pages.release(a)
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
    pages.register(first, page_hashes(tokens, 2))  # three full pages
    assert pages.match_prefix([1, 2, 3, 4, 9, 9]) == first[:2]
    assert pages.refs[first[0]] == 2
    pages.release(first[:2])
    pages.release(first)
    assert pages.num_free == 6
    assert pages.match_prefix(tokens) == first[:3]  # freed but still cached
    pages.release(first[:3])
    taken = pages.allocate(6)  # hands out every page: the cached ones are forgotten
    assert len(taken) == 6 and pages.match_prefix(tokens) == []
