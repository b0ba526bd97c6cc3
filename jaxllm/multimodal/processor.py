"""Llama 4's image processor with Pillow and numpy (the behaviour of HF transformers'
``Llama4ImageProcessorFast``, no torch at run time).

An image of H x W pixels is laid on the canvas of (rows x cols) tiles of ``tile_size``² with
rows · cols <= ``max_patches`` that needs the least scaling: the smallest upscale if some
canvas allows one, else the least downscale, ties to the smallest canvas. It is resized to
fit that canvas without distortion (bilinear, antialiased; not upscaled past one tile unless
``resize_to_max_canvas``), padded with black at the bottom and right, normalised, and cut
into tiles row-major. With more than one tile, the whole image squeezed to one tile (the
global tile) comes last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import ml_dtypes
import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
    """The processor's settings (``preprocessor_config.json``, else the Llama 4 defaults)."""

    tile_size: int = 336
    max_patches: int = 16
    resize_to_max_canvas: bool = False
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dir(cls, directory: str | Path, tile_size: int | None = None) -> ProcessorConfig:
        """Reads ``preprocessor_config.json`` in ``directory`` if there is one; ``tile_size``
        (the vision tower's ``image_size``) is the default side."""
        path = Path(directory) / "preprocessor_config.json"
        base = cls() if tile_size is None else cls(tile_size=tile_size)
        if not path.is_file():
            return base
        raw = json.loads(path.read_text())
        size = raw.get("size") or {}
        side = int(size.get("height", base.tile_size))
        if int(size.get("width", side)) != side:
            raise ValueError(f"{path}: size {size} is not square")
        return cls(tile_size=side, max_patches=int(raw.get("max_patches", base.max_patches)),
                   resize_to_max_canvas=bool(raw.get("resize_to_max_canvas", False)),
                   image_mean=tuple(raw.get("image_mean", base.image_mean)),
                   image_std=tuple(raw.get("image_std", base.image_std)),
                   rescale_factor=float(raw.get("rescale_factor", base.rescale_factor)))


@dataclasses.dataclass(frozen=True)
class ProcessedImage:
    """One image as the vision tower takes it.

    pixel_values [N, 3, S, S] float32: the canvas tiles row-major, then the global tile
        when N > 1.
    grid: (rows, cols) of canvas tiles (HF's ``aspect_ratios``).
    content_hash: a digest of the decoded RGB pixels (the encoder cache's and the prefix
        cache's key: the same picture in another file format hashes the same).
    """

    pixel_values: np.ndarray
    grid: tuple[int, int]
    content_hash: bytes

    @property
    def num_tiles(self) -> int:
        return len(self.pixel_values)


def canvases(max_patches: int, tile: int) -> list[tuple[int, int]]:
    """Every canvas (height, width) in pixels of rows x cols tiles with rows·cols <=
    ``max_patches``."""
    return [(r * tile, c * tile) for r in range(1, max_patches + 1)
            for c in range(1, max_patches // r + 1)]


def best_canvas(height: int, width: int, config: ProcessorConfig) -> tuple[int, int]:
    """The canvas an image of ``height`` x ``width`` goes on (see the module docstring).
    Scales are float32, as HF computes them (torch tensors), so ties break alike."""
    options = canvases(config.max_patches, config.tile_size)
    # The scale that fits the image in a canvas without distortion is the smaller one.
    scale = {c: min(_f32_div(c[0], height), _f32_div(c[1], width)) for c in options}
    ups = [s for s in scale.values() if s >= 1]
    if ups:
        chosen = max(ups) if config.resize_to_max_canvas else min(ups)
    else:
        chosen = max(scale.values())
    return min((c for c in options if scale[c] == chosen), key=lambda c: c[0] * c[1])


def _f32_div(a: int, b: int) -> np.float32:
    return np.float32(a) / np.float32(b)


def fitted_size(height: int, width: int, canvas: tuple[int, int],
                config: ProcessorConfig) -> tuple[int, int]:
    """The (height, width) the image is resized to on ``canvas``: the largest that keeps the
    aspect ratio (sides rounded down, at least 1), without upscaling past one tile unless
    ``resize_to_max_canvas``.

    The arithmetic follows HF's exactly, so the rounding down agrees at exact ratios: a
    limit that is the canvas side is a torch tensor there (float32 ratios), one from the
    image or the tile a Python int (float64).
    """
    limit_h, limit_w = canvas
    canvas_h = canvas_w = True
    if not config.resize_to_max_canvas:
        canvas_h = limit_h < max(height, config.tile_size)
        canvas_w = limit_w < max(width, config.tile_size)
        limit_h = limit_h if canvas_h else max(height, config.tile_size)
        limit_w = limit_w if canvas_w else max(width, config.tile_size)
    scale_h = _f32_div(limit_h, height) if canvas_h else limit_h / height
    scale_w = _f32_div(limit_w, width) if canvas_w else limit_w / width
    if (np.float32(scale_w) < np.float32(scale_h)) if canvas_h or canvas_w else scale_w < scale_h:
        new_h, new_w = min(_floor_times(height, scale_w), limit_h), limit_w
    else:
        new_h, new_w = limit_h, min(_floor_times(width, scale_h), limit_w)
    return max(new_h, 1), max(new_w, 1)


def _floor_times(n: int, scale: float | np.float32) -> int:
    """floor(n · scale), in float32 when ``scale`` is (as torch multiplies a tensor)."""
    product = np.float32(n) * scale if isinstance(scale, np.float32) else n * scale
    return int(np.floor(product))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as HF's ``convert_to_rgb``)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def normalize(pixels: np.ndarray, config: ProcessorConfig) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W] of (x · rescale - mean) / std, each step rounded
    to bfloat16 as HF's Llama 4 processor computes it (its ``rescale_and_normalize``)."""
    bf16 = ml_dtypes.bfloat16
    x = (pixels.astype(np.float32) * np.float32(config.rescale_factor)).astype(bf16)
    mean = np.asarray(config.image_mean, np.float32).astype(bf16).astype(np.float32)
    std = np.asarray(config.image_std, np.float32).astype(bf16).astype(np.float32)
    x = (x.astype(np.float32) - mean).astype(bf16)
    x = (x.astype(np.float32) / std).astype(bf16)
    return np.ascontiguousarray(x.astype(np.float32).transpose(2, 0, 1))


def process_image(image: Image.Image, config: ProcessorConfig) -> ProcessedImage:
    """One decoded image -> its tiles, grid and content hash."""
    rgb = to_rgb(image)
    width, height = rgb.size
    raw = np.asarray(rgb, np.uint8)
    digest = hashlib.sha256(f"{height}x{width}".encode() + raw.tobytes()).digest()
    canvas_h, canvas_w = best_canvas(height, width, config)
    new_h, new_w = fitted_size(height, width, (canvas_h, canvas_w), config)
    canvas = np.zeros((canvas_h, canvas_w, 3), np.uint8)
    canvas[:new_h, :new_w] = np.asarray(rgb.resize((new_w, new_h), Image.BILINEAR))
    tile = config.tile_size
    rows, cols = canvas_h // tile, canvas_w // tile
    tiles = normalize(canvas, config).reshape(3, rows, tile, cols, tile)
    tiles = tiles.transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    if rows * cols > 1:
        squeezed = np.asarray(rgb.resize((tile, tile), Image.BILINEAR))
        tiles = np.concatenate([tiles, normalize(squeezed, config)[None]])
    return ProcessedImage(np.ascontiguousarray(tiles), (rows, cols), digest)
