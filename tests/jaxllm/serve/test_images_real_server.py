"""A real server over a tiny multimodal checkpoint: bad images sent among concurrent good
requests on real sockets are each a JSON 400 naming the problem, and nothing is a 5xx."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from jaxllm import testing as hf_models
from jaxllm.serve.app import NO_IMAGE_STEP
from tests.jaxllm.conftest import run_converter


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm_serve")
    hf_dir = hf_models.save(hf_models.make_multimodal_model(hf_models.SCOUT_LIKE, seed=31),
                            root / "hf")
    hf_models.save_word_tokenizer(hf_dir, hf_models.BASE["vocab_size"])
    ckpt = root / "mm"
    assert run_converter(hf_dir, ckpt, "--dtype", "float32").returncode == 0
    args = ["--model", str(ckpt), "--max-model-len", "64", "--max-num-seqs", "4",
            "--block-size", "8", "--limit-mm-per-prompt", "image=2",
            "--max-image-bytes", "100000", "--max-image-pixels", "250000"]
    with hf_models.serving(args) as url:
        yield url


def _url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def _png(width: int, height: int, noise: bool = True) -> bytes:
    buf = io.BytesIO()
    pixels = (np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8) if noise
              else np.zeros((height, width, 3), np.uint8))
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _chat(*urls: str, detail: str | None = None) -> dict:
    image = {} if detail is None else {"detail": detail}
    parts = [{"type": "text", "text": "w12 w13"}] + [
        {"type": "image_url", "image_url": {"url": u, **image}} for u in urls]
    return {"messages": [{"role": "user", "content": parts}], "max_tokens": 3}


GOOD_PNG = _url(_png(40, 30))
BAD = [
    (_chat("data:image/png;base64,!!!not-base64"), "not valid base64"),
    (_chat(_url(b"GIF89a but not really an image")), "not a PNG, JPEG, WebP or GIF image"),
    (_chat(_url(_png(200, 200))), "exceeds the limit of 100000 bytes"),
    (_chat(_url(_png(1000, 1000, noise=False))), "1000x1000 = 1000000 pixels exceeds the limit"),
    (_chat(GOOD_PNG, GOOD_PNG, GOOD_PNG), "At most 2 image(s) may be provided in one prompt"),
    (_chat("http://example.com/cat.png"), "host 'example.com' is not allowed"),
    (_chat(GOOD_PNG, detail="high"), "image_url.detail 'high' is not supported"),
    (_chat(GOOD_PNG), NO_IMAGE_STEP),
]


def test_bad_images_among_good_requests_are_400s_and_nothing_fails(base):
    good = {"messages": [{"role": "user", "content": "w7 w8 w9"}], "max_tokens": 4}

    def send(body):
        return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)

    with ThreadPoolExecutor(12) as pool:
        goods = [pool.submit(send, good) for _ in range(4)]
        bads = [pool.submit(send, body) for body, _ in BAD]
        goods += [pool.submit(send, good) for _ in range(4)]
        good_answers = [f.result() for f in goods]
        bad_answers = [f.result() for f in bads]
    for r in good_answers:
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] is not None
    for r, (_, needle) in zip(bad_answers, BAD, strict=True):
        assert r.status_code == 400, (needle, r.status_code, r.text)
        body = r.json()
        assert body["object"] == "error" and body["code"] == 400
        assert needle in body["message"], (needle, body["message"])
    assert httpx.get(f"{base}/health").status_code == 200
