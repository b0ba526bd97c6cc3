"""The encoder cache: hits by content hash, bounded, evicts only images no request holds."""

from __future__ import annotations

import pytest

from jaxllm.multimodal.encoder_cache import EncoderCache, EncoderCacheFull


def test_hit_by_hash_and_miss():
    cache = EncoderCache(capacity=10)
    assert cache.get(b"a", "r1") is None
    cache.put(b"a", "features-a", 4, "r1")
    assert cache.get(b"a", "r2") == "features-a" and b"a" in cache and len(cache) == 1
    cache.put(b"a", "again", 4, "r3")  # already cached: kept, not replaced
    assert cache.get(b"a", "r3") == "features-a" and cache.used == 4


def test_held_images_are_never_evicted():
    cache = EncoderCache(capacity=10)
    cache.put(b"a", "A", 6, "r1")
    assert not cache.can_hold(5)
    with pytest.raises(EncoderCacheFull, match="no room for 5 feature rows: 6 of 10 are held"):
        cache.put(b"b", "B", 5, "r2")
    assert b"a" in cache and b"b" not in cache
    cache.release("r1")
    assert cache.can_hold(5)
    cache.put(b"b", "B", 5, "r2")  # evicts a, which nobody holds now
    assert b"a" not in cache and cache.used == 5


def test_eviction_is_least_recently_used_among_unheld():
    cache = EncoderCache(capacity=9)
    for key in (b"a", b"b", b"c"):
        cache.put(key, key, 3, "r")
    cache.release("r")
    cache.get(b"a", "r2")  # a is recent and held
    cache.release("r2")
    cache.put(b"d", b"d", 3, "r3")  # evicts b: the least recently used
    assert [k for k in (b"a", b"b", b"c", b"d") if k in cache] == [b"a", b"c", b"d"]


def test_an_image_shared_by_two_requests_stays_until_both_release():
    cache = EncoderCache(capacity=4)
    cache.put(b"a", "A", 4, "r1")
    cache.get(b"a", "r2")
    cache.release("r1")
    assert not cache.can_hold(1)
    cache.release("r2")
    assert cache.can_hold(4)


def test_bounds_are_checked():
    with pytest.raises(ValueError, match="capacity=0"):
        EncoderCache(0)
    cache = EncoderCache(capacity=4, bytes_per_row=10)
    assert cache.num_bytes == 40
    with pytest.raises(EncoderCacheFull, match="5 feature rows exceeds .* capacity of 4"):
        cache.put(b"big", "X", 5, "r")
