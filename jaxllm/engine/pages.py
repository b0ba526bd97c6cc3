"""KV-cache pages: allocation, reference counts and prefix caching.

A page that is full of computed tokens is registered under a hash of its tokens chained with
the hash of the page before it, so equal prefixes (not just equal pages) map to one page. A
freed page keeps its contents and hash until it is handed out again, oldest freed first, so a
later request with the same prefix can pick it back up.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from jaxllm.kv_cache import CacheConfig


def chain_hash(parent: bytes, page_tokens: Sequence[int]) -> bytes:
    """128-bit hash of a page's tokens chained to the hash of the page before it (collisions
    would silently share the wrong keys, so not Python's 64-bit ``hash``)."""
    data = np.asarray(page_tokens, np.int64).tobytes()
    return hashlib.blake2b(parent + data, digest_size=16).digest()


def page_hashes(tokens: Sequence[int], page_size: int, known: Sequence[bytes] = ()
                ) -> list[bytes]:
    """Chained hashes of every full page of ``tokens``; ``known`` are those of its first
    pages, already computed, which are extended rather than recomputed."""
    hashes = list(known)
    for start in range(len(hashes) * page_size, len(tokens) - page_size + 1, page_size):
        hashes.append(chain_hash(hashes[-1] if hashes else b"",
                                 tokens[start : start + page_size]))
    return hashes


class PageAllocator:
    """Hands out the pages of the cache ``cache`` describes (its page count and size)."""

    def __init__(self, cache: CacheConfig):
        if cache.num_pages is None:
            raise ValueError("the page allocator needs a sized cache (num_pages)")
        self.cache = cache
        num_pages = self.num_pages = cache.num_pages
        self.refs = [0] * num_pages
        self.free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(num_pages))
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}

    @property
    def page_size(self) -> int:
        return self.cache.page_size

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh pages, or None (nothing taken) when fewer are free."""
        if n > len(self.free):
            return None
        pages = []
        for _ in range(n):
            page, _ = self.free.popitem(last=False)
            self._forget(page)
            self.refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: Sequence[int]) -> None:
        for page in pages:
            if self.refs[page] <= 0:
                raise RuntimeError(f"page {page} released more often than taken")
            self.refs[page] -= 1
            if self.refs[page] == 0:
                self.free[page] = None

    def match_prefix(self, tokens: Sequence[int]) -> list[int]:
        """Takes (adds a reference to) the cached pages holding the longest cached prefix."""
        pages = []
        for h in page_hashes(tokens, self.page_size):
            page = self.by_hash.get(h)
            if page is None:
                break
            if self.refs[page] == 0:
                del self.free[page]
            self.refs[page] += 1
            pages.append(page)
        return pages

    def register(self, pages: Sequence[int], hashes: Sequence[bytes]) -> None:
        """Records full pages under their chained hashes (``hashes[i]`` for ``pages[i]``)."""
        for page, h in zip(pages, hashes, strict=False):
            if page in self.hash_of:
                continue
            if h not in self.by_hash:  # a different page may already hold this prefix
                self.by_hash[h] = page
                self.hash_of[page] = h

    def _forget(self, page: int) -> None:
        h = self.hash_of.pop(page, None)
        if h is not None and self.by_hash.get(h) == page:
            del self.by_hash[h]
