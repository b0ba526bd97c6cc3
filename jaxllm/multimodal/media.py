"""Images from request URLs: ``data:`` URLs (base64 PNG, JPEG, WebP, GIF) and http(s) URLs of
allowed hosts only, each bounded in bytes and pixels. Every refusal is a ``MediaError``
whose message names the problem and the limit (the server's 400)."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import urllib.error
import urllib.parse
import urllib.request

from PIL import Image, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


class MediaError(ValueError):
    """An image that cannot be used: undecodable, too large, or from a host not allowed."""


@dataclasses.dataclass(frozen=True)
class MediaLimits:
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    allowed_domains: frozenset[str] = frozenset()  # hosts http(s) images may come from
    fetch_timeout_s: float = 10.0


def image_bytes(url: str, limits: MediaLimits) -> bytes:
    """The encoded image a ``data:`` or allowed http(s) URL holds (blocking: run it off the
    event loop)."""
    if url.startswith("data:"):
        return _data_url(url, limits)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise MediaError(f"image_url must be a data: URL or an http(s) URL, got scheme "
                         f"{parts.scheme or 'none'!r}")
    host = (parts.hostname or "").lower()
    if host not in limits.allowed_domains:
        allowed = ", ".join(sorted(limits.allowed_domains)) or "none"
        raise MediaError(f"image URL host {host!r} is not allowed (--allowed-media-domains: "
                         f"{allowed})")
    return _fetch(url, limits)


def _data_url(url: str, limits: MediaLimits) -> bytes:
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma or not header.endswith(";base64"):
        raise MediaError("a data: image URL must be 'data:image/<type>;base64,<data>'")
    media_type = header[: -len(";base64")]
    if not media_type.startswith("image/"):
        raise MediaError(f"data: URL media type {media_type!r} is not an image type")
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise MediaError(f"image of about {len(payload) * 3 // 4} bytes exceeds the limit of "
                         f"{limits.max_image_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"data: URL image is not valid base64: {e}") from None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise MediaError(f"image URL redirects (HTTP {code}) to {newurl!r}: redirects are not "
                         f"followed")


def _fetch(url: str, limits: MediaLimits) -> bytes:
    opener = urllib.request.build_opener(_NoRedirects)
    try:
        with opener.open(url, timeout=limits.fetch_timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and int(declared) > limits.max_image_bytes:
                raise MediaError(f"image of {declared} bytes exceeds the limit of "
                                 f"{limits.max_image_bytes} bytes")
            data = response.read(limits.max_image_bytes + 1)
    except MediaError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise MediaError(f"cannot fetch image URL {url!r}: {e}") from None
    if len(data) > limits.max_image_bytes:
        raise MediaError(f"image exceeds the limit of {limits.max_image_bytes} bytes")
    return data


def decode_image(data: bytes, limits: MediaLimits) -> Image.Image:
    """A decoded image (the first frame of an animation), its size checked before its
    pixels are decoded."""
    if len(data) > limits.max_image_bytes:
        raise MediaError(f"image of {len(data)} bytes exceeds the limit of "
                         f"{limits.max_image_bytes} bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise MediaError(f"image has too many pixels: {e}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise MediaError(f"image data is not a PNG, JPEG, WebP or GIF image: {e}") from None
    if image.format not in FORMATS:
        raise MediaError(f"image format {image.format} is not supported (PNG, JPEG, WebP, GIF)")
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise MediaError(f"image of {width}x{height} = {width * height} pixels exceeds the "
                         f"limit of {limits.max_image_pixels} pixels")
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError(f"image data is corrupt ({image.format}): {e}") from None
    return image
