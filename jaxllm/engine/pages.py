"""KV-cache pages: one pool shared by every layer group, reference counts, prefix caching.

A page that is full of computed tokens is registered under (its layer group, a hash of its
tokens chained with the hash of the page before it), so equal prefixes (not just equal pages)
map to one page. A freed page keeps its contents and hash until it is handed out again, oldest
freed first, so a later request with the same prefix can pick it back up. Page 0 is the null
page (``NULL_PAGE``): never handed out, it fills the table entries a chunked group dropped.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from jaxllm.kv_cache import NULL_PAGE, CacheConfig
from jaxllm.layout import first_needed_page


def chain_hash(parent: bytes, page_tokens: Sequence[int], extra: bytes = b"") -> bytes:
    """128-bit hash of a page's tokens chained to the hash of the page before it (collisions
    would silently share the wrong keys, so not Python's 64-bit ``hash``); ``extra`` is what
    else the page's keys depend on (the hashes of images under its tokens)."""
    data = np.asarray(page_tokens, np.int64).tobytes()
    return hashlib.blake2b(parent + data + extra, digest_size=16).digest()


# An image's placeholder tokens in a sequence: (first position, token count, content hash).
ImageSpan = tuple[int, int, bytes]


def page_hashes(tokens: Sequence[int], page_size: int, known: Sequence[bytes] = (),
                images: Sequence[ImageSpan] = ()) -> list[bytes]:
    """Chained hashes of every full page of ``tokens``; ``known`` are those of its first
    pages, already computed, which are extended rather than recomputed."""
    hashes = list(known)
    extend_page_hashes(hashes, tokens[len(hashes) * page_size:], page_size, images)
    return hashes


def extend_page_hashes(hashes: list[bytes], tail: Sequence[int], page_size: int,
                       images: Sequence[ImageSpan] = ()) -> None:
    """Appends to ``hashes`` (of a sequence's first pages) those of the full pages of
    ``tail``, the tokens that follow them. A page that overlaps an image's placeholder span
    in ``images`` also hashes that image's content hash: the same text over another image
    never shares the page, the same image does."""
    first = len(hashes) * page_size  # the position of tail[0]
    for start in range(0, len(tail) - page_size + 1, page_size):
        lo = first + start
        extra = b"".join(h for pos, n, h in images if pos < lo + page_size and pos + n > lo)
        hashes.append(chain_hash(hashes[-1] if hashes else b"", tail[start : start + page_size],
                                 extra))


class PageRow:
    """One layer group's row of a request's block table: page ids in position order, kept in
    a growing int32 array, so a step's block tables are copied, not converted from 1M-entry
    Python lists. Reads like a list of ints (``len``, iteration, slices, ``==``).

    Once the request runs, its rows live in the persistent batch's block table (``bind``):
    every change lands there, and a step gathers its tables with one copy."""

    __slots__ = ("_buf", "_len", "_bound")

    def __init__(self, pages: Sequence[int] = ()):
        self._buf = np.array(pages, np.int32).reshape(-1)
        self._len = len(self._buf)
        self._bound = False

    def bind(self, storage: np.ndarray) -> None:
        """Keeps the row in ``storage`` (a row of a block table, ``NULL_PAGE`` past its
        pages) from now on."""
        if self._len > len(storage):
            raise ValueError(f"{self._len} pages do not fit a block-table row of "
                             f"{len(storage)}")
        storage[: self._len] = self._buf[: self._len]
        storage[self._len:] = NULL_PAGE
        self._buf, self._bound = storage, True

    @property
    def bound(self) -> bool:
        return self._bound

    @property
    def array(self) -> np.ndarray:
        """The pages as an int32 view (no copy)."""
        return self._buf[: self._len]

    def __array__(self, dtype=None, copy=None):
        return self.array if dtype is None else self.array.astype(dtype)

    def __len__(self) -> int:
        return self._len

    def __iter__(self):
        return iter(self.array.tolist())

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.array[index].tolist()
        return int(self.array[index])

    def __setitem__(self, index: slice, values: Sequence[int]) -> None:
        self.array[index] = values

    def __iadd__(self, pages: Sequence[int]) -> PageRow:
        n = len(pages)
        if self._len + n > len(self._buf):
            if self._bound:
                raise ValueError(f"{self._len + n} pages do not fit a block-table row of "
                                 f"{len(self._buf)}")
            grown = np.empty(max(2 * len(self._buf), self._len + n, 16), np.int32)
            grown[: self._len] = self.array
            self._buf = grown
        self._buf[self._len: self._len + n] = pages
        self._len += n
        return self

    def count(self, page: int) -> int:
        return int(np.count_nonzero(self.array == page))

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def __repr__(self) -> str:
        return f"PageRow({list(self)})"


class PageAllocator:
    """Hands out the pages of the cache ``cache`` describes to the layer groups whose chunk
    sizes are ``group_chunk`` (None: a global group, which keeps a sequence's whole history)."""

    def __init__(self, cache: CacheConfig, group_chunk: Sequence[int | None] = (None,)):
        if cache.num_pages is None:
            raise ValueError("the page allocator needs a sized cache (num_pages)")
        self.cache, self.group_chunk = cache, tuple(group_chunk)
        self.num_pages = cache.num_pages
        self.reset()

    def reset(self) -> None:
        """Every page free and the prefix cache empty: for a new cache, or one whose contents
        were lost (after a failed step), when no request holds pages any more."""
        self.refs = [0] * (self.num_pages + 1)
        self.free: OrderedDict[int, None] = OrderedDict(
            (p, None) for p in range(1, self.num_pages + 1))
        self.by_hash: dict[tuple[int, bytes], int] = {}
        self.hash_of: dict[int, tuple[int, bytes]] = {}

    @property
    def page_size(self) -> int:
        return self.cache.page_size

    @property
    def num_groups(self) -> int:
        return len(self.group_chunk)

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
            if page == NULL_PAGE:
                continue
            if self.refs[page] <= 0:
                raise RuntimeError(f"page {page} released more often than taken")
            self.refs[page] -= 1
            if self.refs[page] == 0:
                self.free[page] = None

    def match_prefix(self, tokens: Sequence[int], images: Sequence[ImageSpan] = ()
                     ) -> list[list[int]]:
        """Takes (adds a reference to) the cached pages of the longest prefix of ``tokens``
        (whose ``images`` are hashed into the pages they overlap) that every group can resume
        from: global groups need every page of it, chunked groups the pages of its last
        chunk. Returns each group's table row."""
        hashes = page_hashes(tokens, self.page_size, images=images)
        length = 0  # pages every global group has
        while length < len(hashes) and all(
                (g, hashes[length]) in self.by_hash
                for g, c in enumerate(self.group_chunk) if c is None):
            length += 1
        while length:
            first = {g: first_needed_page(length * self.page_size, self.page_size, c)
                     for g, c in enumerate(self.group_chunk)}
            missing = [j for g in first for j in range(first[g], length)
                       if (g, hashes[j]) not in self.by_hash]
            if not missing:
                break
            length = min(missing)  # resume before the first page a chunked group lacks
        rows = []
        for g in range(self.num_groups):
            start = first_needed_page(length * self.page_size, self.page_size,
                                      self.group_chunk[g]) if length else 0
            row = [NULL_PAGE] * start
            for j in range(start, length):
                page = self.by_hash[(g, hashes[j])]
                if self.refs[page] == 0:
                    del self.free[page]
                self.refs[page] += 1
                row.append(page)
            rows.append(row)
        return rows

    def register(self, group: int, pages: Sequence[int], hashes: Sequence[bytes]) -> None:
        """Records a group's full pages under their chained hashes (``hashes[i]`` for
        ``pages[i]``); null entries are skipped."""
        for page, h in zip(pages, hashes, strict=False):
            if page == NULL_PAGE or page in self.hash_of:
                continue
            if (group, h) not in self.by_hash:  # a different page may hold this prefix
                self.by_hash[(group, h)] = page
                self.hash_of[page] = (group, h)

    def _forget(self, page: int) -> None:
        key = self.hash_of.pop(page, None)
        if key is not None and self.by_hash.get(key) == page:
            del self.by_hash[key]
