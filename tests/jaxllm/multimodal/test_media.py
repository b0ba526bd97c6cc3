"""Images from URLs: each bad one refused with a message that names the problem."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import numpy as np
import pytest
from PIL import Image

from jaxllm.multimodal.media import MediaError, MediaLimits, decode_image, image_bytes

LIMITS = MediaLimits(max_image_bytes=200_000, max_image_pixels=1_000_000)


def _encoded(fmt: str, size=(20, 10), mode="RGB") -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], len(mode)), np.uint8)
    Image.fromarray(pixels.squeeze(), mode).save(buf, fmt)
    return buf.getvalue()


def _data_url(data: bytes, media_type="image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_data_urls_of_each_format_decode(fmt):
    data = image_bytes(_data_url(_encoded(fmt)), LIMITS)
    image = decode_image(data, LIMITS)
    assert image.size == (20, 10) and image.format == fmt


@pytest.mark.parametrize("url,message", [
    ("data:image/png;base64,@@@@", "not valid base64"),
    ("data:image/png,rawbytes", "must be 'data:image/<type>;base64,<data>'"),
    ("data:text/plain;base64,aGVsbG8=", "media type 'text/plain' is not an image type"),
    ("file:///etc/passwd", "scheme 'file'"),
    ("http://example.com/a.png", "host 'example.com' is not allowed (--allowed-media-domains: "
                                 "none)"),
    ("data:image/png;base64," + "A" * 300_000, "exceeds the limit of 200000 bytes"),
])
def test_bad_urls_are_refused_by_name(url, message):
    with pytest.raises(MediaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        image_bytes(url, LIMITS)


def test_bad_image_data_is_refused_by_name():
    with pytest.raises(MediaError, match="not a PNG, JPEG, WebP or GIF image"):
        decode_image(b"hello, not an image", LIMITS)
    with pytest.raises(MediaError, match="format BMP is not supported"):
        decode_image(_encoded("BMP"), LIMITS)
    with pytest.raises(MediaError, match="corrupt"):
        decode_image(_encoded("PNG", size=(200, 200))[:2000], LIMITS)
    # A small file of many pixels is refused before its pixels are decoded.
    big = io.BytesIO()
    Image.new("L", (2000, 1000)).save(big, "PNG")
    assert len(big.getvalue()) < LIMITS.max_image_bytes
    with pytest.raises(MediaError, match="2000x1000 = 2000000 pixels exceeds the limit of "
                                         "1000000 pixels"):
        decode_image(big.getvalue(), LIMITS)


@pytest.fixture()
def image_host():
    png = _encoded("PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://elsewhere.example/a.png")
                self.end_headers()
                return
            body = png if self.path == "/a.png" else b"x" * 300_000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", png
    server.shutdown()


def test_http_images_only_from_allowed_hosts_and_bounded(image_host):
    base, png = image_host
    allowed = MediaLimits(max_image_bytes=200_000, allowed_domains=frozenset({"127.0.0.1"}))
    assert image_bytes(f"{base}/a.png", allowed) == png
    with pytest.raises(MediaError, match="host '127.0.0.1' is not allowed"):
        image_bytes(f"{base}/a.png", LIMITS)
    with pytest.raises(MediaError, match="300000 bytes exceeds the limit of 200000"):
        image_bytes(f"{base}/big.png", allowed)
    with pytest.raises(MediaError, match="redirects .HTTP 302. to 'http://elsewhere.example"):
        image_bytes(f"{base}/redirect", allowed)
