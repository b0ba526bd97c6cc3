"""Chat requests with images, in process over a fake engine: every bad image is a JSON 400
that names the problem, and the server keeps serving."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from jaxllm.multimodal.media import MediaLimits
from jaxllm.multimodal.processor import ProcessorConfig
from jaxllm.serve.app import ServerState, build_app
from jaxllm.serve.async_engine import AsyncEngine
from jaxllm.serve.images import ImageInput, parse_mm_limit
from jaxllm.serve.metrics import Metrics
from tests.jaxllm.serve.test_app_guards import ServingEngine, TextCodec, _call, _error

LIMITS = MediaLimits(max_image_bytes=100_000, max_image_pixels=250_000)


def _png(width=30, height=20) -> bytes:
    buf = io.BytesIO()
    rgb = np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8)
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _url(data: bytes, media_type="image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def _chat(*urls: str) -> dict:
    parts = [{"type": "text", "text": "what is this? "}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"messages": [{"role": "user", "content": parts}], "max_tokens": 2}


@pytest.fixture
def app():
    engine = AsyncEngine(ServingEngine())
    images = ImageInput(ProcessorConfig(tile_size=28), LIMITS, max_images=2)
    yield build_app(ServerState(engine, TextCodec(), "tiny", Metrics("tiny"), images=images))
    engine.shutdown()


def _big_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1000, 1000)).save(buf, "PNG")  # small file, 1M pixels
    return buf.getvalue()


@pytest.mark.parametrize("body,needle", [
    (_chat("data:image/png;base64,%%%%"), "messages.0.content: data: URL image is not valid "
                                          "base64"),
    (_chat(_url(b"plain text, not an image")), "not a PNG, JPEG, WebP or GIF image"),
    (_chat(_url(b"\0" * 200_000)), "exceeds the limit of 100000 bytes"),
    (_chat(_url(_big_png())), "1000x1000 = 1000000 pixels exceeds the limit of 250000 pixels"),
    (_chat(_url(_png()), _url(_png()), _url(_png())),
     "At most 2 image(s) may be provided in one prompt; this one has 3"),
    (_chat("http://example.com/a.png"), "host 'example.com' is not allowed "
                                        "(--allowed-media-domains: none)"),
    (_chat("ftp://example.com/a.png"), "scheme 'ftp'"),
    (_chat(_url(_png())), "this model's tokenizer has no image tokens"),
])
def test_each_bad_image_is_a_400_naming_the_problem(app, body, needle):
    assert needle in _error(_call(app, "POST", "/v1/chat/completions", json=body), 400)
    text = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert _call(app, "POST", "/v1/chat/completions", json=text).status_code == 200


def test_tokenize_refuses_images(app):
    body = {"messages": _chat(_url(_png()))["messages"]}
    assert "/tokenize does not take images" in _error(_call(app, "POST", "/tokenize",
                                                            json=body), 400)


@pytest.mark.parametrize("text,count", [("image=3", 3), ('{"image": 0}', 0), ("image=1", 1)])
def test_limit_mm_per_prompt_forms(text, count):
    assert parse_mm_limit(text) == count


@pytest.mark.parametrize("text,needle", [("video=2", "modality ['video'] is not supported"),
                                         ("image=x", "expected image=N"),
                                         ("image=-1", "must be >= 0")])
def test_bad_limit_mm_per_prompt_is_refused(text, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        parse_mm_limit(text)
