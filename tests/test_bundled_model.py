"""The bundled model: it answers, and ``python -m jaxllm.serve`` serves it with no arguments."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import openai
import pytest

import jaxllm
from jaxllm import testing
from jaxllm.serve.tokenizer import TextCodec

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "checkpoints" / "tiny-llama4"


def _training_script():
    spec = importlib.util.spec_from_file_location("train_tiny", REPO / "scripts" / "train_tiny.py")
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


@pytest.fixture(scope="module")
def default_server():
    with testing.serving([], cwd=REPO) as base:  # no arguments: the bundled model
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)


def test_serve_out_of_the_box_answers(default_server):
    [model] = default_server.models.list().data
    assert model.id == "tiny-llama4"
    for a, b in [(12, 35), (58, 67), (99, 1)]:
        reply = default_server.chat.completions.create(
            model="tiny-llama4", temperature=0, max_tokens=8,
            messages=[{"role": "user", "content": f"What is {a} + {b}?"}])
        assert reply.choices[0].message.content == str(a + b)
        assert reply.choices[0].finish_reason == "stop"


def _served_sums_right(flags: list[str], pairs) -> int:
    """Right answers to ``pairs`` from ``python -m jaxllm.serve FLAGS`` (the bundled model)."""
    from concurrent.futures import ThreadPoolExecutor

    train = _training_script()
    with testing.serving(flags, cwd=REPO) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)

        def ask(pair):
            a, b = (int(x) for x in pair)
            reply = client.chat.completions.create(
                model="tiny-llama4", temperature=0, max_tokens=4,
                messages=[{"role": "user", "content": train.question(a, b)}])
            return reply.choices[0].message.content == str(a + b)

        with ThreadPoolExecutor(8) as pool:
            return sum(pool.map(ask, pairs))


@pytest.fixture(scope="module")
def sums():
    _, held_out = _training_script().make_split(seed=0, held_out=500)
    pairs = held_out[np.random.default_rng(1).permutation(len(held_out))[:200]]
    return pairs, _served_sums_right([], pairs)


@pytest.mark.parametrize("flags", [
    ["--quantization", "int4"],
    pytest.param(["--quantization", "fp8"], marks=pytest.mark.slow),
    pytest.param(["--quantization", "int8"], marks=pytest.mark.slow),
    pytest.param(["--quantization", "fp8", "--kv-cache-dtype", "fp8"], marks=pytest.mark.slow),
], ids=" ".join)
def test_quantized_at_load_adds_as_well_as_unquantized(sums, flags):
    """200 held-out sums through the server: within 1 point (2 sums) of the unquantized
    model's score."""
    pairs, baseline = sums
    assert baseline >= 180
    assert abs(_served_sums_right(flags, pairs) - baseline) <= 2
