"""A real server over a tiny multimodal checkpoint: greedy tokens for a chat image_url part
(openai client, data: URL) and for a completion's multi_modal_data equal HF's; bad images
sent among concurrent good requests (with images too) on real sockets are each a JSON 400
naming the problem, and nothing is a 5xx; a text-only checkpoint refuses images."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from jaxllm.multimodal.media import MediaLimits, decode_image
from jaxllm.multimodal.processor import ProcessorConfig, process_image
from jaxllm.multimodal.prompt import ImageTokens, expand_prompt
from tests.jaxllm.conftest import run_converter
from tests.support import hf_models

# --skip-warmup: programs compile as requests first need them (a fraction of the
# warm-up's); warm-up itself is tested by the bundled model's server and test_startup.py.
SERVE = ["--max-model-len", "96", "--max-num-seqs", "4", "--block-size", "8",
         "--limit-mm-per-prompt", "image=2", "--max-image-bytes", "100000",
         "--max-image-pixels", "250000", "--skip-warmup"]


@pytest.fixture(scope="module")
def mm_model(tmp_path_factory):
    """(HF model, tokenizer, converted checkpoint) of a tiny multimodal Scout-like model."""
    root = tmp_path_factory.mktemp("mm_serve")
    hf = hf_models.make_multimodal_model(hf_models.SCOUT_LIKE, seed=31)
    hf_dir = hf_models.save(hf, root / "hf")
    hf_models.save_word_tokenizer(hf_dir, hf_models.BASE["vocab_size"], images=True)
    ckpt = root / "mm"
    assert run_converter(hf_dir, ckpt, "--dtype", "float32").returncode == 0
    return hf, Tokenizer.from_file(str(ckpt / "tokenizer.json")), ckpt


@pytest.fixture
def served(mm_model, server_pool):
    """(HF model, tokenizer, URL) of the shared server over ``mm_model``'s checkpoint."""
    hf, tokenizer, ckpt = mm_model
    return hf, tokenizer, server_pool.shared(["--model", str(ckpt), *SERVE]).url


@pytest.fixture
def base(served):
    return served[2]


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
    # A completion whose prompt has fewer <|image|> placeholders than images.
    ({"prompt": "w12 <|image|>", "max_tokens": 2,
      "multi_modal_data": {"image": [GOOD_PNG, GOOD_PNG]}},
     "has 1 image placeholder(s) for 2 image(s)"),
]


def test_bad_images_among_good_requests_are_400s_and_nothing_fails(base):
    good = {"messages": [{"role": "user", "content": "w7 w8 w9"}], "max_tokens": 4}
    with_image = _chat(GOOD_PNG)

    def send(body):
        route = "completions" if "prompt" in body else "chat/completions"
        return httpx.post(f"{base}/v1/{route}", json=body, timeout=120)

    with ThreadPoolExecutor(12) as pool:
        goods = [pool.submit(send, good if i % 2 else with_image) for i in range(4)]
        bads = [pool.submit(send, body) for body, _ in BAD]
        goods += [pool.submit(send, good if i % 2 else with_image) for i in range(4)]
        good_answers = [f.result() for f in goods]
        bad_answers = [f.result() for f in bads]
    for r in good_answers:
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
    for r, (_, needle) in zip(bad_answers, BAD, strict=True):
        assert r.status_code == 400, (needle, r.status_code, r.text)
        body = r.json()
        assert body["object"] == "error" and body["code"] == 400
        assert needle in body["message"], (needle, body["message"])
    assert httpx.get(f"{base}/health").status_code == 200


def _reference(hf, tokenizer: Tokenizer, png: bytes, text_ids: list[int], n: int) -> str:
    """HF's greedy text for ``text_ids`` whose one <|image|> takes ``png``, processed by our
    processor (itself checked against HF's in tests/jaxllm/multimodal/test_processor.py)."""
    image = process_image(decode_image(png, MediaLimits()), ProcessorConfig(tile_size=28))
    tokens = ImageTokens.from_vocab(tokenizer.token_to_id)
    ids = expand_prompt(text_ids, [image.grid], 4, tokens)
    out = hf_models.hf_image_generate(hf, ids, torch.from_numpy(image.pixel_values), n)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_chat_image_url_through_the_openai_client_equals_hf(served):
    import openai

    hf, tokenizer, url = served
    png = _png(60, 30)  # a 1 x 2 tile canvas and the global tile
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id, max_tokens=8, temperature=0.0,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "w12 w13"},
            {"type": "image_url", "image_url": {"url": _url(png)}}]}])
    # The chat template renders "<s><|user|> w12 w13<|image|> <|assistant|>".
    ids = [tokenizer.token_to_id(t) for t in ("<s>", "<|user|>", "w12", "w13", "<|image|>",
                                              "<|assistant|>")]
    assert reply.choices[0].message.content == _reference(hf, tokenizer, png, ids, 8)


def test_completion_with_multi_modal_data_equals_hf(served):
    hf, tokenizer, url = served
    png = _png(30, 30, noise=True)
    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "prompt": "w20 <|image|> w21", "max_tokens": 6, "temperature": 0,
        "multi_modal_data": {"image": _url(png)}})
    assert r.status_code == 200, r.text
    ids = [tokenizer.token_to_id(t) for t in ("w20", "<|image|>", "w21")]
    assert r.json()["choices"][0]["text"] == _reference(hf, tokenizer, png, ids, 6)


def test_a_text_only_checkpoint_refuses_images(tiny_model, server_pool):
    _, _, path = tiny_model("scout")
    url = server_pool.shared(["--model", str(path), *SERVE]).url
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "prompt": [1, 20, 324], "max_tokens": 2, "multi_modal_data": {"image": GOOD_PNG}})
    assert r.status_code == 400 and r.json()["object"] == "error"
    assert "this model takes no images" in r.json()["message"]
    assert httpx.get(f"{url}/health").status_code == 200


def _hits(url: str) -> float:
    import re

    text = httpx.get(f"{url}/metrics").text
    return float(re.search(r"^vllm:prefix_cache_hits_total\{[^}]*\} ([\d.e+]+)$", text,
                           re.M).group(1))


def test_prefix_cache_hits_the_same_image_and_misses_another(served):
    _, _, url = served

    def chat(png: bytes) -> dict:
        body = _chat(_url(png))
        body["temperature"] = 0
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    first_png, other_png = _png(44, 30), _png(48, 30)  # two images not sent before
    before = _hits(url)
    first = chat(first_png)
    assert _hits(url) == before
    again = chat(first_png)
    length = again["usage"]["prompt_tokens"]
    assert again["choices"][0]["message"] == first["choices"][0]["message"]
    assert _hits(url) == before + (length - 1) // 8 * 8  # every full page of the prompt
    chat(other_png)  # the image starts in the first page: nothing before it to share
    assert _hits(url) == before + (length - 1) // 8 * 8
