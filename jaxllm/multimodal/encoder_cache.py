"""The encoder cache: projected image features kept by image content hash, so an image is
encoded once however many requests (or recomputes after preemption) use it.

Bounded by feature rows (``capacity``; bytes = rows x text width x dtype size, for the memory
plan: ``bytes_per_row``). A request holds the images it needs from the moment it is
scheduled until it finishes or is preempted (``release``); an entry no running request
holds stays cached and is evicted, least recently used first, only when room is needed.

The engine's side (``jaxllm.multimodal.feeder``): the scheduler's hook encodes an image a
piece reaches and ``put``s it, or cuts the piece before it when ``can_hold`` says no; a
piece's features come from ``get``; ``drop`` once a request's pieces have passed an image,
``release`` on finish, abort and preemption.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class EncoderCacheFull(Exception):
    """An image cannot be held: the images of running requests fill the cache."""


class EncoderCache:
    def __init__(self, capacity: int, bytes_per_row: int = 0):
        if capacity <= 0:
            raise ValueError(f"encoder cache capacity={capacity} feature rows must be positive")
        self.capacity = capacity
        self.bytes_per_row = bytes_per_row
        self._entries: OrderedDict[bytes, Any] = OrderedDict()  # LRU first
        self._rows: dict[bytes, int] = {}
        self._holders: dict[bytes, set[str]] = {}
        self._held_by: dict[str, set[bytes]] = {}

    @property
    def used(self) -> int:
        """Feature rows stored."""
        return sum(self._rows.values())

    @property
    def num_bytes(self) -> int:
        return self.capacity * self.bytes_per_row

    def __contains__(self, image_hash: bytes) -> bool:
        return image_hash in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, image_hash: bytes, request_id: str) -> Any | None:
        """The features of a cached image (None if not cached); ``request_id`` now holds it."""
        if image_hash not in self._entries:
            return None
        self._entries.move_to_end(image_hash)
        self._hold(image_hash, request_id)
        return self._entries[image_hash]

    def can_hold(self, rows: int) -> bool:
        """Whether ``rows`` more feature rows fit after evicting every unheld entry."""
        held = sum(self._rows[h] for h in self._entries if self._holders.get(h))
        return held + rows <= self.capacity

    def put(self, image_hash: bytes, features: Any, rows: int, request_id: str) -> None:
        """Stores an encoded image for ``request_id``, evicting unheld entries (least recently
        used first) as needed; raises ``EncoderCacheFull`` when held ones leave no room."""
        if image_hash in self._entries:
            self.get(image_hash, request_id)
            return
        if rows > self.capacity:
            raise EncoderCacheFull(f"an image of {rows} feature rows exceeds the encoder cache "
                                   f"capacity of {self.capacity}")
        if not self.can_hold(rows):
            raise EncoderCacheFull(f"no room for {rows} feature rows: {self.used} of "
                                   f"{self.capacity} are held by running requests")
        while self.used + rows > self.capacity:
            victim = next(h for h in self._entries if not self._holders.get(h))
            del self._entries[victim], self._rows[victim]
            self._holders.pop(victim, None)
        self._entries[image_hash] = features
        self._rows[image_hash] = rows
        self._hold(image_hash, request_id)

    def release(self, request_id: str) -> None:
        """``request_id`` (finished, aborted or preempted) holds no image any more."""
        for image_hash in self._held_by.pop(request_id, ()):
            holders = self._holders.get(image_hash)
            if holders is not None:
                holders.discard(request_id)

    def drop(self, image_hash: bytes, request_id: str) -> None:
        """``request_id`` holds ``image_hash`` no more (it has passed the image's tokens)."""
        holders = self._holders.get(image_hash)
        if holders is not None:
            holders.discard(request_id)
        held = self._held_by.get(request_id)
        if held is not None:
            held.discard(image_hash)

    def _hold(self, image_hash: bytes, request_id: str) -> None:
        self._holders.setdefault(image_hash, set()).add(request_id)
        self._held_by.setdefault(request_id, set()).add(image_hash)
