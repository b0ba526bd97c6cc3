"""Images in the serving engine: each request's images and where their features go, the
encoder run once per distinct image (``EncoderCache``), and each step's feature rows.

A request's prompt is already expanded (``jaxllm.multimodal.prompt``): its ``<|patch|>``
tokens take, in order, the features of its images' tiles. ``RequestImages`` records per
prompt position the request's feature row (-1 for text) and per image its span of
positions, the prefix cache's ``ImageSpan``.

The scheduler asks ``ImageFeeder.fit`` how many of a piece's tokens may run: an image the
piece reaches is encoded now (once: the cache is keyed by the pixels' hash) and held by the
request; a piece is cut before an image that the cache cannot hold while other requests
hold theirs. A request holds an image until its pieces have passed it, or until it is
finished or preempted (``release``); an image nobody holds stays cached until its room is
needed. The engine then asks ``piece`` for the feature rows a piece covers, and
``step_features`` lays them out as the step's ``image_rows`` / ``image_features``.

Features travel to the device in ``StepInputs`` as 4-byte words (``pack_features``: a
bfloat16 row of E values is E / 2 words), so followers of a multi-process engine receive
them with the rest of the step. A step without images has ``image_features`` of 0 rows (a
program of its own, compiled in warm-up like the step with images).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import VisionConfig
from jaxllm.multimodal.encoder_cache import EncoderCache
from jaxllm.multimodal.prompt import feature_rows

# Tiles of one image at most: 16 canvas tiles and the global one (Llama 4's max_patches).
MAX_IMAGE_TILES = 17


@dataclasses.dataclass(frozen=True)
class RequestImage:
    """One image of a request: its tiles, key, and where its features go."""

    pixel_values: np.ndarray  # [N, C, S, S] float32
    content_hash: bytes
    first_row: int  # its first feature row among the request's
    num_rows: int  # N x tokens_per_tile
    start: int  # the prompt position of its first <|patch|> token
    end: int  # one past its last <|patch|> token


@dataclasses.dataclass(frozen=True)
class RequestImages:
    """A request's images in prompt order and, per prompt position, its feature row."""

    images: tuple[RequestImage, ...]
    rows: np.ndarray  # [len(prompt)] int32: the request's feature row, -1 for text

    @property
    def spans(self) -> list[tuple[int, int, bytes]]:
        """The prefix cache's image spans (``jaxllm.engine.pages.extend_page_hashes``)."""
        return [(im.start, im.end - im.start, im.content_hash) for im in self.images]


def pixels_hash(pixels: np.ndarray) -> bytes:
    """A key for tiles given without one (a ``ProcessedImage`` brings its own)."""
    data = np.ascontiguousarray(pixels, np.float32)
    return hashlib.blake2b(repr(data.shape).encode() + data.tobytes(), digest_size=16).digest()


def request_images(prompt: Sequence[int], images: Sequence[Any], vision: VisionConfig | None,
                   max_tiles: int = MAX_IMAGE_TILES) -> RequestImages | None:
    """The ``RequestImages`` of an expanded ``prompt`` and its ``images`` in prompt order
    (``ProcessedImage``s, or tiles ``[N, C, S, S]``); None without images. ValueError (a
    400) for a model without a vision tower, an image of more than ``max_tiles`` tiles, bad
    tile shapes, or a count of ``<|patch|>`` tokens other than the images' features."""
    if not images:
        return None
    if vision is None:
        raise ValueError("this model has no vision tower (a text-only checkpoint, or one "
                         "converted with --text-only): it cannot take images")
    want = (vision.num_channels, vision.image_size, vision.image_size)
    out, first = [], 0
    for i, image in enumerate(images):
        pixels = np.asarray(getattr(image, "pixel_values", image), np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != want or not 1 <= len(pixels) <= max_tiles:
            raise ValueError(f"image {i}: tiles must be [1..{max_tiles}, "
                             f"{', '.join(map(str, want))}], got {pixels.shape}")
        key = getattr(image, "content_hash", None) or pixels_hash(pixels)
        rows = len(pixels) * vision.tokens_per_tile
        out.append((pixels, key, first, rows))
        first += rows
    rows = feature_rows(prompt, vision.image_token_id, first)
    where = np.flatnonzero(rows >= 0)
    made = []
    for pixels, key, first, count in out:
        positions = where[first: first + count]
        made.append(RequestImage(pixels, key, first, count, int(positions[0]),
                                  int(positions[-1]) + 1))
    return RequestImages(tuple(made), rows)


@dataclasses.dataclass(frozen=True)
class PieceImages:
    """The features one piece takes: ``rows[i]`` is piece row i's row of ``features``."""

    rows: np.ndarray  # [piece length] int32, -1 for text
    features: np.ndarray  # [m, E] in the model's dtype


class ImageFeeder:
    """The engine's images: ``encode(tiles) -> features [N, tokens_per_tile, E]`` runs the
    tower (through the executor, so every process runs it), whose outputs the cache of
    ``capacity`` feature rows keeps. ``num_encoded`` counts encoder runs (one per distinct
    image while it stays cached)."""

    def __init__(self, vision: VisionConfig, encode: Callable[[np.ndarray], np.ndarray],
                 capacity: int, dtype: Any, max_tiles: int = MAX_IMAGE_TILES):
        largest = max_tiles * vision.tokens_per_tile
        if capacity < largest:
            raise ValueError(f"encoder cache of {capacity} feature rows cannot hold one image "
                             f"of {max_tiles} tiles ({largest} rows)")
        self.vision, self.encode, self.max_tiles = vision, encode, max_tiles
        self.dtype = np.dtype(dtype)
        width = vision.text_hidden_size
        self.cache = EncoderCache(capacity, width * self.dtype.itemsize)
        self.num_encoded = 0

    def fit(self, request: Any, start: int, n: int) -> int:
        """How many of the ``n`` tokens from ``start`` may run now (the scheduler's hook):
        each image they reach is cached (encoded if it is not) and held by ``request``; the
        piece ends before the first image there is no room for. Images before ``start`` are
        let go."""
        images = request.images
        if images is None:
            return n
        rid = request.request_id
        for image in images.images:
            if image.end <= start:
                self.cache.drop(image.content_hash, rid)
            elif image.start < start + n:
                if self.cache.get(image.content_hash, rid) is not None:
                    continue
                if not self.cache.can_hold(image.num_rows):
                    return max(0, image.start - start)
                features = self.encode(image.pixel_values)
                self.num_encoded += 1
                self.cache.put(image.content_hash,
                               np.asarray(features, self.dtype).reshape(image.num_rows, -1),
                               image.num_rows, rid)
        return n

    def release(self, request: Any) -> None:
        """``request`` (finished, aborted, preempted) holds no image any more."""
        self.cache.release(request.request_id)

    def covers(self, request: Any, start: int, length: int) -> bool:
        """Whether ``request``'s piece of ``length`` rows from ``start`` takes image features
        (covers a ``<|patch|>`` token)."""
        images = request.images
        return (images is not None and start < len(images.rows)
                and bool(np.any(images.rows[start: start + length] >= 0)))

    def piece(self, request: Any, start: int, length: int) -> PieceImages | None:
        """The features of ``request``'s piece of ``length`` rows from ``start`` (None when
        it covers no ``<|patch|>`` token); every image it covers was ``fit`` in."""
        images = request.images
        if images is None or start >= len(images.rows):
            return None
        rows = np.full(length, -1, np.int32)
        covered = images.rows[start: start + length]
        rows[: len(covered)] = covered
        taken = rows[rows >= 0]
        if not taken.size:
            return None
        lo, hi = int(taken[0]), int(taken[-1]) + 1  # patch rows run in order
        parts = []
        for image in images.images:
            a, b = max(lo, image.first_row), min(hi, image.first_row + image.num_rows)
            if a < b:
                features = self.cache.get(image.content_hash, request.request_id)
                if features is None:
                    raise RuntimeError(f"request {request.request_id}: an image of its piece "
                                       f"at {start} is not in the encoder cache")
                parts.append(features[a - image.first_row: b - image.first_row])
        rows[rows >= 0] -= lo
        return PieceImages(rows, np.concatenate(parts))

    def describe(self) -> str:
        """The start-up report's line."""
        c = self.cache
        return (f"images: encoder cache of {c.capacity} feature rows ({c.num_bytes / 2**20:.1f}"
                f" MiB of host memory), at most {self.max_tiles} tiles an image")

    def warmup(self) -> int:
        """Compiles the encoder for every tile bucket up to ``max_tiles``; returns how many."""
        vision = self.vision
        side = vision.image_size
        buckets = [1 << i for i in range((self.max_tiles - 1).bit_length() + 1)]
        for tiles in buckets:
            self.encode(np.zeros((tiles, vision.num_channels, side, side), np.float32))
        return len(buckets)


def feature_words(width: int, dtype: Any) -> int:
    """4-byte words of one feature row of ``width`` values of ``dtype``."""
    size = width * np.dtype(dtype).itemsize
    if size % 4:
        raise ValueError(f"a feature row of {width} x {np.dtype(dtype).name} is not a "
                         f"multiple of 4 bytes")
    return size // 4


def pack_features(features: np.ndarray) -> np.ndarray:
    """``[M, E]`` features as ``[M, feature_words]`` uint32 (their bits)."""
    return np.ascontiguousarray(features).view(np.uint32)


def unpack_features(words: jax.Array, dtype: Any) -> jax.Array:
    """``pack_features``'s inverse inside a step: ``[M, W]`` uint32 -> ``[M, E]`` ``dtype``."""
    dtype = jnp.dtype(dtype)
    out = jax.lax.bitcast_convert_type(words, dtype)
    return out.reshape(words.shape[0], -1)


def step_features(pieces: Sequence[PieceImages | None], starts: np.ndarray, num_rows: int,
                  words: int) -> tuple[np.ndarray, np.ndarray]:
    """A step's ``image_rows [T]`` (the feature row each flat row takes, -1 for text) and
    ``image_features``: ``[T, words]`` when a piece brings features (no step holds more
    feature rows than rows), else ``[0, words]``. ``starts`` are the step's
    ``query_start_loc``; ``pieces[s]`` is slot s's."""
    rows = np.full(num_rows, -1, np.int32)
    if not any(p is not None for p in pieces):
        return rows, np.zeros((0, words), np.uint32)
    features = np.zeros((num_rows, words), np.uint32)
    offset = 0
    for s, piece in enumerate(pieces):
        if piece is None:
            continue
        first, m = int(starts[s]), len(piece.features)
        if len(piece.rows) != starts[s + 1] - first:
            raise ValueError(f"sequence {s}: {len(piece.rows)} image rows for a piece of "
                             f"{starts[s + 1] - first} rows")
        if offset + m > num_rows:
            raise ValueError(f"{offset + m} image feature rows in a step of {num_rows} rows")
        features[offset: offset + m] = pack_features(piece.features)
        rows[first: first + len(piece.rows)] = np.where(piece.rows >= 0, piece.rows + offset,
                                                        -1)
        offset += m
    return rows, features
