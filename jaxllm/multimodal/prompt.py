"""The prompt expansion of Llama 4 image placeholders (HF's ``Llama4Processor``) and the
host-side index of which flat token row takes which image feature.

Each ``<|image|>`` placeholder of a rendered prompt becomes ``<|image_start|>``, then, only
when the image has several tiles, per tile row: ``tokens_per_tile`` ``<|patch|>`` per tile
with ``<|tile_x_separator|>`` between tiles and ``<|tile_y_separator|>`` after the row; then
``<|image|>`` and ``tokens_per_tile`` ``<|patch|>`` for the global tile, ``<|image_end|>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

SPECIAL_NAMES = {"start": "<|image_start|>", "end": "<|image_end|>", "image": "<|image|>",
                 "patch": "<|patch|>", "tile_x": "<|tile_x_separator|>",
                 "tile_y": "<|tile_y_separator|>"}


@dataclasses.dataclass(frozen=True)
class ImageTokens:
    """The ids of Llama 4's image special tokens (read from the tokenizer)."""

    start: int
    end: int
    image: int
    patch: int
    tile_x: int
    tile_y: int

    @classmethod
    def from_vocab(cls, token_to_id: Callable[[str], int | None]) -> ImageTokens:
        """Looks each token up with ``token_to_id`` (e.g. ``tokenizers.Tokenizer.token_to_id``);
        raises ValueError naming the tokens the vocabulary lacks."""
        ids = {key: token_to_id(tok) for key, tok in SPECIAL_NAMES.items()}
        missing = [SPECIAL_NAMES[k] for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"the tokenizer has no image token(s) {missing}: not a Llama 4 "
                             f"multimodal tokenizer")
        return cls(**ids)


def image_token_ids(grid: tuple[int, int], tokens_per_tile: int, tokens: ImageTokens
                    ) -> list[int]:
    """The expansion of one image whose tiles form ``grid`` = (rows, cols)."""
    rows, cols = grid
    out = [tokens.start]
    if rows * cols > 1:
        for _ in range(rows):
            for col in range(cols):
                out += [tokens.patch] * tokens_per_tile
                if col < cols - 1:
                    out.append(tokens.tile_x)
            out.append(tokens.tile_y)
    out += [tokens.image] + [tokens.patch] * tokens_per_tile + [tokens.end]
    return out


def expand_prompt(ids: Sequence[int], grids: Sequence[tuple[int, int]], tokens_per_tile: int,
                  tokens: ImageTokens) -> list[int]:
    """``ids`` with its i-th ``<|image|>`` placeholder replaced by the expansion of image i."""
    placeholders = sum(1 for t in ids if t == tokens.image)
    if placeholders != len(grids):
        raise ValueError(f"the prompt has {placeholders} image placeholder(s) for "
                         f"{len(grids)} image(s)")
    out: list[int] = []
    images = iter(grids)
    for t in ids:
        out += image_token_ids(next(images), tokens_per_tile, tokens) if t == tokens.image \
            else [t]
    return out


def feature_rows(ids: Sequence[int] | np.ndarray, patch_id: int, num_features: int,
                 first: int = 0) -> np.ndarray:
    """For each token of ``ids``: the image-feature row it takes (``first``, ``first`` + 1,
    ... over its ``<|patch|>`` tokens in order), or -1. As HF does, the count of patch tokens
    must equal the number of features."""
    ids = np.asarray(ids)
    is_patch = ids == patch_id
    count = int(is_patch.sum())
    if count != num_features:
        raise ValueError(f"image features and image tokens do not match: the prompt has "
                         f"{count} <|patch|> tokens, its images give {num_features} features")
    rows = np.full(ids.shape, -1, np.int32)
    rows[is_patch] = first + np.arange(count, dtype=np.int32)
    return rows
