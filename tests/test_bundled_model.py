"""The bundled model: it answers, and ``python -m jaxllm.serve`` serves it with no arguments."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

import jaxllm
from jaxllm.multimodal.processor import ProcessorConfig
from jaxllm.multimodal.prompt import ImageTokens
from jaxllm.serve.tokenizer import TextCodec
from tests.support import BUNDLED, REPO


def _training_script(name: str = "train_tiny"):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_checkpoint_is_small_and_complete():
    files = [p for p in BUNDLED.rglob("*") if p.is_file()]
    assert (BUNDLED / "jaxllm_checkpoint.json").is_file()
    assert (BUNDLED / "tokenizer.json").is_file() and (BUNDLED / "config.json").is_file()
    assert max(p.stat().st_size for p in files) < 20 * 2**20


def test_bundled_model_adds_sums_it_never_saw():
    train = _training_script()
    _, held_out = train.make_split(seed=0, held_out=500)
    pairs = held_out[np.random.default_rng(1).permutation(len(held_out))[:100]]
    model = jaxllm.load_model(BUNDLED, max_model_len=64)
    codec = TextCodec.from_dir(BUNDLED)
    prompts = [codec.encode(codec.render_chat([{"role": "user",
                                                "content": train.question(a, b)}]),
                            add_special_tokens=False) for a, b in pairs]
    answers = [codec.decode(o) for o in jaxllm.generate(model, prompts, max_new_tokens=4)]
    right = sum(ans == str(a + b) for ans, (a, b) in zip(answers, pairs, strict=True))
    assert right >= 90, list(zip(answers, pairs.tolist(), strict=True))[:10]


def test_bundled_checkpoint_has_a_vision_tower_and_its_processor():
    model = jaxllm.load_model(BUNDLED, max_model_len=64)
    vision = model.require_vision()
    processor = ProcessorConfig.from_dir(BUNDLED)
    assert (BUNDLED / "preprocessor_config.json").is_file()
    assert processor.tile_size == vision.image_size and processor.max_patches == 1
    tokens = ImageTokens.from_vocab(TextCodec.from_dir(BUNDLED).tokenizer.token_to_id)
    assert tokens.patch == vision.image_token_id < model.config.vocab_size


def _pictures(seed: int, n: int):
    """``n`` pictures of 1-4 shapes of one colour, drawn here with numpy (not the training
    script's Pillow drawing), and their counts and colour names."""
    colours = {"red": (210, 40, 40), "green": (40, 160, 50), "blue": (40, 70, 220),
               "yellow": (225, 200, 20), "purple": (140, 50, 170)}
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        side = int(rng.integers(32, 97))
        name = list(colours)[int(rng.integers(len(colours)))]
        count = int(rng.integers(1, 5))
        pixels = np.full((side, side, 3), int(rng.integers(215, 256)), np.uint8)
        yy, xx = np.mgrid[:side, :side] + 0.5
        centres: list[tuple[float, float]] = []
        r = side * 0.11
        while len(centres) < count:
            x, y = rng.uniform(r, side - r, 2)
            if all((x - a) ** 2 + (y - b) ** 2 > (2.5 * r) ** 2 for a, b in centres):
                centres.append((x, y))
                disc = (xx - x) ** 2 + (yy - y) ** 2 <= r * r
                square = (abs(xx - x) <= 0.85 * r) & (abs(yy - y) <= 0.85 * r)
                pixels[disc if len(centres) % 2 else square] = colours[name]
        out.append((Image.fromarray(pixels), count, name))
    return out


def test_bundled_model_answers_about_pictures_it_never_saw():
    """50 new pictures through ``generate()``: how many shapes, and their colour; at least
    45 of 50 right for each question."""
    vision = _training_script("train_vision_tiny")
    model = jaxllm.load_model(BUNDLED, max_model_len=64)
    codec = TextCodec.from_dir(BUNDLED)
    drawn = _pictures(seed=7, n=50)
    pictures = [p for p, _, _ in drawn]
    counts = vision.answer_pictures(model, codec, pictures, "How many shapes?")
    colours = vision.answer_pictures(model, codec, pictures, "What colour?")
    right_counts = sum(a == str(c) for a, (_, c, _) in zip(counts, drawn, strict=True))
    right_colours = sum(a == c for a, (_, _, c) in zip(colours, drawn, strict=True))
    assert right_counts >= 45, list(zip(counts, [c for _, c, _ in drawn], strict=True))
    assert right_colours >= 45, list(zip(colours, [c for _, _, c in drawn], strict=True))


def _readme_picture() -> str:
    """The README's picture: its one-liner run as the README runs it, a base64 PNG."""
    import re
    import subprocess
    import sys

    readme = (REPO / "README.md").read_text()
    [code] = re.findall(r'IMG=\$\(\.venv/bin/python -c "(.*?)"\)', readme, re.S)
    assert "It answers `3` (and `blue` to \"What colour?\")." in readme
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_readme_picture_is_answered_as_the_readme_says():
    """The README's curl example: its one-liner's PNG, read from the data: URL as the server
    reads it, gets "3" and "blue" through ``generate()``."""
    from jaxllm.multimodal.media import MediaLimits, decode_image, image_bytes

    limits = MediaLimits()
    picture = decode_image(image_bytes(f"data:image/png;base64,{_readme_picture()}", limits),
                           limits)
    vision = _training_script("train_vision_tiny")
    model = jaxllm.load_model(BUNDLED, max_model_len=64)
    codec = TextCodec.from_dir(BUNDLED)
    assert vision.answer_pictures(model, codec, [picture], "How many shapes?") == ["3"]
    assert vision.answer_pictures(model, codec, [picture], "What colour?") == ["blue"]


@pytest.fixture
def default_server(bundled_server):
    return bundled_server.client()


def test_serve_out_of_the_box_answers(default_server):
    [model] = default_server.models.list().data
    assert model.id == "tiny-llama4"
    for a, b in [(12, 35), (58, 67), (99, 1)]:
        reply = default_server.chat.completions.create(
            model="tiny-llama4", temperature=0, max_tokens=8,
            messages=[{"role": "user", "content": f"What is {a} + {b}?"}])
        assert reply.choices[0].message.content == str(a + b)
        assert reply.choices[0].finish_reason == "stop"


def test_serve_out_of_the_box_answers_the_readme_picture(default_server):
    """The README's curl request (its picture as a data: URL in an image_url part) through
    the server started with no arguments."""
    url = f"data:image/png;base64,{_readme_picture()}"
    for question, answer in [("How many shapes?", "3"), ("What colour?", "blue")]:
        reply = default_server.chat.completions.create(
            model="tiny-llama4", temperature=0, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": question}]}])
        assert reply.choices[0].message.content == answer


def _served_sums_right(pool, flags: list[str], pairs) -> int:
    """Right answers to ``pairs`` from ``python -m jaxllm.serve FLAGS`` (the bundled model)."""
    from concurrent.futures import ThreadPoolExecutor

    train = _training_script()
    client = pool.shared(flags, cwd=REPO).client()

    def ask(pair):
        a, b = (int(x) for x in pair)
        reply = client.chat.completions.create(
            model="tiny-llama4", temperature=0, max_tokens=4,
            messages=[{"role": "user", "content": train.question(a, b)}])
        return reply.choices[0].message.content == str(a + b)

    with ThreadPoolExecutor(8) as threads:
        return sum(threads.map(ask, pairs))


@pytest.fixture(scope="module")
def sums(server_pool):
    _, held_out = _training_script().make_split(seed=0, held_out=500)
    pairs = held_out[np.random.default_rng(1).permutation(len(held_out))[:200]]
    return pairs, _served_sums_right(server_pool, [], pairs)


# Every scheme is slow (a minute each on CI's cores, with the unquantized reference's
# server): int4 and fp8 equal HF's quantized references in tests/jaxllm/model/test_quant.py.
@pytest.mark.parametrize("flags", [
    pytest.param(["--quantization", "int4"], marks=pytest.mark.slow),
    pytest.param(["--quantization", "fp8"], marks=pytest.mark.slow),
    pytest.param(["--quantization", "int8"], marks=pytest.mark.slow),
    pytest.param(["--quantization", "fp8", "--kv-cache-dtype", "fp8"], marks=pytest.mark.slow),
], ids=" ".join)
def test_quantized_at_load_adds_as_well_as_unquantized(server_pool, sums, flags):
    """200 held-out sums through the server: within 1 point (2 sums) of the unquantized
    model's score."""
    pairs, baseline = sums
    assert baseline >= 180
    assert abs(_served_sums_right(server_pool, flags, pairs) - baseline) <= 2
