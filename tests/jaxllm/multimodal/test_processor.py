"""The image processor and the prompt expansion against references transcribed from HF
transformers' source (5.24.0), never against our own code:

- ``transformers/models/llama4/image_processing_llama4.py`` (``image_processing_llama4_fast.py``
  in 4.x): ``get_factors``, ``find_supported_resolutions``, ``get_best_fit``,
  ``get_max_res_without_distortion``, and the target-size logic of
  ``Llama4ImageProcessor._preprocess``; ``transformers/image_transforms.py``:
  ``split_to_tiles``.
- ``transformers/models/llama4/processing_llama4.py``: ``Llama4Processor._prompt_split_image``
  and ``replace_image_token`` (tokens per tile).

HF's processor itself cannot be imported here (it imports torchvision, whose wheels on this
index fail beside the CPU torch), so these are transcriptions, in torch where HF computes in
torch (float32 scales). The pixels are checked against a numpy resample written from the
definition of an antialiased bilinear filter (a triangle stretched by the downscale factor).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from jaxllm.multimodal.processor import ProcessorConfig, best_canvas, process_image
from jaxllm.multimodal.prompt import SPECIAL_NAMES, ImageTokens, expand_prompt, image_token_ids

TILE, MAX_PATCHES = 336, 16
# (height, width): a single pixel, very wide, very tall, larger than every canvas, exact
# tiles and one pixel off them, common photo sizes, thin strips, tiny odd sizes.
SIZES = [(1, 1), (1, 2000), (2000, 1), (3000, 4000), (5000, 5000), (336, 336), (337, 336),
         (335, 335), (100, 200), (200, 300), (448, 448), (672, 336), (1000, 700), (50, 1500),
         (1500, 50), (720, 1280), (1080, 1920), (13, 7), (336, 5376), (400, 2100), (2, 3),
         (999, 1001), (800, 600)]


# --- transcribed from image_processing_llama4.py -------------------------------------------

def hf_get_factors(dividend: int) -> set[int]:
    factors_set = set()
    for i in range(1, int(dividend**0.5) + 1):
        if dividend % i == 0:
            factors_set.add(i)
            factors_set.add(dividend // i)
    return factors_set


def hf_find_supported_resolutions(max_num_chunks: int, patch_size: int) -> list:
    asp_dict = defaultdict(list)
    for chunk_size in range(max_num_chunks, 0, -1):
        _factors = sorted(hf_get_factors(chunk_size))
        _asp_ratios = [(factor, chunk_size // factor) for factor in _factors]
        for height, width in _asp_ratios:
            ratio_float = height / width
            asp_dict[ratio_float].append((height, width))
    possible_resolutions = []
    for value in asp_dict.values():
        for height, depth in value:
            possible_resolutions.append((height * patch_size, depth * patch_size))
    return possible_resolutions


def hf_get_best_fit(image_size, possible_resolutions, resize_to_max_canvas=False):
    original_height, original_width = image_size
    target_heights, target_widths = possible_resolutions[:, 0], possible_resolutions[:, 1]
    scale_w = target_widths / original_width
    scale_h = target_heights / original_height
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)
    upscaling_options = scales[scales >= 1]
    if len(upscaling_options) > 0:
        if resize_to_max_canvas:
            selected_scale = torch.max(upscaling_options)
        else:
            selected_scale = torch.min(upscaling_options)
    else:
        downscaling_options = scales[scales < 1]
        selected_scale = torch.max(downscaling_options)
    chosen_canvas = possible_resolutions[scales == selected_scale]
    if len(chosen_canvas) > 1:
        areas = chosen_canvas[:, 0] * chosen_canvas[:, 1]
        optimal_idx = torch.argmin(areas)
        optimal_canvas = chosen_canvas[optimal_idx]
    else:
        optimal_canvas = chosen_canvas[0]
    return optimal_canvas


def hf_get_max_res_without_distortion(image_size, target_size):
    original_height, original_width = image_size
    target_height, target_width = target_size
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        new_width = target_width
        new_height = min(math.floor(original_height * scale_w), target_height)
    else:
        new_height = target_height
        new_width = min(math.floor(original_width * scale_h), target_width)
    return new_height, new_width


def hf_target_sizes(image_size, resize_to_max_canvas=False, max_patches=MAX_PATCHES,
                    tile=TILE):
    """``Llama4ImageProcessor._preprocess`` up to the resize: (canvas, resized size)."""
    possible_resolutions = torch.tensor(hf_find_supported_resolutions(max_patches, tile))
    target_size = hf_get_best_fit(image_size, possible_resolutions,
                                  resize_to_max_canvas=resize_to_max_canvas)
    max_upscaling_size = None if resize_to_max_canvas else tile
    if max_upscaling_size is not None:
        new_target_height = min(max(image_size[0], max_upscaling_size), target_size[0])
        new_target_width = min(max(image_size[1], max_upscaling_size), target_size[1])
        target_size_without_distortion = (new_target_height, new_target_width)
    else:
        target_size_without_distortion = target_size
    new_size = hf_get_max_res_without_distortion(image_size, target_size_without_distortion)
    new_size = (max(int(new_size[0]), 1), max(int(new_size[1]), 1))
    return (int(target_size[0]), int(target_size[1])), new_size


# --- transcribed from image_transforms.py ---------------------------------------------------

def hf_split_to_tiles(images, num_tiles_height, num_tiles_width):
    batch_size, num_channels, height, width = images.size()
    images = images.view(batch_size, num_channels, num_tiles_height, height // num_tiles_height,
                         num_tiles_width, width // num_tiles_width)
    image = images.permute(0, 2, 4, 1, 3, 5).contiguous()
    return image.view(batch_size, num_tiles_width * num_tiles_height, num_channels,
                      height // num_tiles_height, width // num_tiles_width)


# --- transcribed from processing_llama4.py --------------------------------------------------

def hf_prompt_split_image(aspect_ratio, num_patches_per_chunk):
    img_string = "<|image_start|>"
    ratio_h, ratio_w = aspect_ratio
    if ratio_h * ratio_w > 1:
        for _yy in range(ratio_h):
            for xx in range(ratio_w):
                img_string += "<|patch|>" * num_patches_per_chunk
                if xx < ratio_w - 1:
                    img_string += "<|tile_x_separator|>"
            img_string += "<|tile_y_separator|>"
    img_string += "<|image|>"
    img_string += "<|patch|>" * num_patches_per_chunk
    img_string += "<|image_end|>"
    return img_string


def hf_num_patches_per_chunk(tile=TILE, patch_size=14, pixel_shuffle_ratio=0.5):
    downsample_ratio = int(round(1.0 / (pixel_shuffle_ratio**2)))
    return int((tile // patch_size) * (tile // patch_size) // downsample_ratio)


# --- an antialiased bilinear resample from its definition ------------------------------------

def _resample_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[out, in] weights: output pixel i (centre (i + 0.5)·s in input coordinates, s = in/out)
    averages input pixels under a triangle of half-width max(s, 1)."""
    scale = size_in / size_out
    width = max(scale, 1.0)
    centres = (np.arange(size_out) + 0.5) * scale
    inputs = np.arange(size_in) + 0.5
    w = np.clip(1 - np.abs(inputs[None, :] - centres[:, None]) / width, 0, None)
    return w / w.sum(axis=1, keepdims=True)


def reference_resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3]."""
    rows = _resample_matrix(pixels.shape[0], height)
    cols = _resample_matrix(pixels.shape[1], width)
    out = np.einsum("hH,HWc->hWc", rows, pixels.astype(np.float64), optimize=True)
    out = np.einsum("hWc,wW->hwc", out, cols, optimize=True)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def reference_tiles(pixels: np.ndarray) -> np.ndarray:
    """The tiles [N, 3, S, S] in [0, 1] (before normalisation) that HF makes of ``pixels``."""
    height, width = pixels.shape[:2]
    (canvas_h, canvas_w), (new_h, new_w) = hf_target_sizes((height, width))
    canvas = np.zeros((canvas_h, canvas_w, 3), np.uint8)  # pad_to_best_fit: fill 0
    canvas[:new_h, :new_w] = reference_resize(pixels, new_h, new_w)
    chw = torch.from_numpy(canvas.transpose(2, 0, 1).astype(np.float64) / 255)[None]
    rows, cols = canvas_h // TILE, canvas_w // TILE
    tiles = hf_split_to_tiles(chw, rows, cols)[0].numpy()
    if rows * cols > 1:
        glob = reference_resize(pixels, TILE, TILE).transpose(2, 0, 1) / 255
        tiles = np.concatenate([tiles, glob[None]])
    return tiles


def _image(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus noise, so that resampling errors would show."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = 127 + 100 * np.sin(6 * x + 4 * y + phase)
    return np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


CONFIG = ProcessorConfig(tile_size=TILE, max_patches=MAX_PATCHES)


def test_at_least_twenty_varied_sizes():
    assert len(SIZES) >= 20
    ratios = [h / w for h, w in SIZES]
    assert min(ratios) < 1 / 1000 and max(ratios) > 1000  # very wide and very tall
    assert (1, 1) in SIZES and any(h > 4 * TILE and w > 4 * TILE for h, w in SIZES)


@pytest.mark.parametrize("resize_to_max_canvas", [False, True])
@pytest.mark.parametrize("max_patches", [16, 5, 1])
def test_canvas_is_hf_best_fit(resize_to_max_canvas, max_patches):
    config = ProcessorConfig(tile_size=TILE, max_patches=max_patches,
                             resize_to_max_canvas=resize_to_max_canvas)
    extra = [(h * 7 + 3, w * 5 + 1) for h, w in SIZES]  # more ratios, same range
    for size in SIZES + extra:
        canvas, _ = hf_target_sizes(size, resize_to_max_canvas, max_patches)
        assert best_canvas(*size, config) == canvas, size


@pytest.mark.heavy
@pytest.mark.parametrize("index", range(len(SIZES)))
def test_tiles_equal_hf_within_2_of_255(index):
    height, width = SIZES[index]
    pixels = _image(height, width, seed=index)
    ours = process_image(Image.fromarray(pixels), CONFIG)
    (canvas_h, canvas_w), _ = hf_target_sizes((height, width))
    grid = (canvas_h // TILE, canvas_w // TILE)
    assert ours.grid == grid
    assert ours.pixel_values.shape == (grid[0] * grid[1] + (grid != (1, 1)), 3, TILE, TILE)
    assert ours.pixel_values.dtype == np.float32
    ref = reference_tiles(pixels)
    # Back from (x - 0.5) / 0.5 to [0, 1]: the tolerance is in units of one 8-bit level.
    diff = np.abs((ours.pixel_values * 0.5 + 0.5) - ref)
    assert diff.max() <= 2 / 255, (SIZES[index], diff.max() * 255)


def test_transparency_is_composited_onto_white_and_grey_becomes_rgb():
    rgba = np.zeros((40, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:20, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    ours = process_image(Image.fromarray(rgba, "RGBA"), CONFIG).pixel_values[0] * 0.5 + 0.5
    # Resized 40x30 -> 336x252: the top rows are (200, 0, 0), the bottom rows white.
    np.testing.assert_allclose(ours[:, 5, 5], [200 / 255, 0, 0], atol=2 / 255)
    np.testing.assert_allclose(ours[:, 330, 5], [1, 1, 1], atol=2 / 255)
    assert np.all(ours[:, :, 260:] == 0)  # padding is black: 0 before normalisation
    grey = process_image(Image.fromarray(np.full((8, 8), 90, np.uint8), "L"), CONFIG)
    np.testing.assert_allclose(grey.pixel_values[0, :, 0, 0] * 0.5 + 0.5, [90 / 255] * 3,
                               atol=1 / 255)


def test_content_hash_is_of_the_pixels_not_the_file():
    import io

    pixels = _image(50, 70, seed=1)
    png, bmp = io.BytesIO(), io.BytesIO()
    Image.fromarray(pixels).save(png, "PNG")
    Image.fromarray(pixels).save(bmp, "BMP")
    a = process_image(Image.open(png), CONFIG).content_hash
    b = process_image(Image.open(bmp), CONFIG).content_hash
    other = pixels.copy()
    other[0, 0, 0] ^= 1
    assert a == b != process_image(Image.fromarray(other), CONFIG).content_hash


def test_processor_config_from_scout_preprocessor_json(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        '{"size": {"height": 336, "width": 336}, "max_patches": 16, '
        '"resize_to_max_canvas": false, "image_mean": [0.5, 0.5, 0.5], '
        '"image_std": [0.5, 0.5, 0.5], "rescale_factor": 0.00392156862745098}')
    assert ProcessorConfig.from_dir(tmp_path) == ProcessorConfig()
    assert ProcessorConfig.from_dir(tmp_path / "none", tile_size=28).tile_size == 28


NAMES = {i: name for i, name in enumerate(SPECIAL_NAMES.values(), start=1000)}
TOKENS = ImageTokens.from_vocab({v: k for k, v in NAMES.items()}.get)


@pytest.mark.parametrize("grid", [(1, 1), (1, 2), (2, 1), (2, 2), (1, 16), (16, 1), (4, 4),
                                  (3, 5)])
def test_prompt_expansion_equals_hf(grid):
    per_tile = hf_num_patches_per_chunk()
    assert per_tile == 144
    ours = "".join(NAMES[t] for t in image_token_ids(grid, per_tile, TOKENS))
    assert ours == hf_prompt_split_image(grid, per_tile)


def test_expand_prompt_replaces_each_placeholder_in_order():
    ids = [5, TOKENS.image, 6, 7, TOKENS.image, 8]
    out = expand_prompt(ids, [(1, 1), (1, 2)], 2, TOKENS)
    text = "".join(NAMES.get(t, f"[{t}]") for t in out)
    assert text == ("[5]" + hf_prompt_split_image((1, 1), 2) + "[6][7]"
                    + hf_prompt_split_image((1, 2), 2) + "[8]")
    with pytest.raises(ValueError, match="2 image placeholder.s. for 1 image"):
        expand_prompt(ids, [(1, 1)], 2, TOKENS)


def test_missing_image_tokens_are_named():
    with pytest.raises(ValueError, match="no image token.*<\\|patch\\|>"):
        ImageTokens.from_vocab({"<|image|>": 1}.get)
