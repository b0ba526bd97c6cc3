"""A tiny Llama 4 with Llama 4's real chunk (8192) served at max_model_len 20000 with default
flags: bounded start-up memory, and HF's greedy tokens at the end of the context."""

from __future__ import annotations

import time

import numpy as np
import psutil
import pytest
import torch

from tests.jaxllm.conftest import run_converter
from tests.support import hf_models


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.slow
def test_20000_tokens_with_chunk_8192(tmp_path, server_pool):
    import httpx

    hf = hf_models.make_text_model(dict(hf_models.SCOUT_LIKE, attention_chunk_size=8192,
                                        max_position_embeddings=32768), seed=12)
    hf_models.save(hf, tmp_path / "hf")
    assert run_converter(tmp_path / "hf", tmp_path / "jx", "--dtype", "float32").returncode == 0
    flags = ["--model", str(tmp_path / "jx"), "--max-model-len", "20000",
             "--compilation-cache-dir", ""]
    begin = time.monotonic()
    with server_pool.private(flags, reason="its start-up's time and peak memory are measured",
                             track_rss=True) as server:
        proc, port, peak = server.proc, server.port, server.peak_rss
        started = time.monotonic() - begin
        rng = np.random.default_rng(5)
        results = {}
        for length, new in ((19_999, 1), (19_500, 500)):
            prompt = rng.integers(3, hf_models.BASE["vocab_size"], length).tolist()
            t0 = time.monotonic()
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=3600, json={
                "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
                "logprobs": 0})
            assert reply.status_code == 200, reply.text
            seconds = time.monotonic() - t0
            tokens = [int(t.removeprefix("token_id:"))
                      for t in reply.json()["choices"][0]["logprobs"]["tokens"]]
            results[length] = (seconds, tokens == _hf_greedy(hf, prompt, new))
        # And it keeps serving short requests afterwards.
        short = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=600, json={
            "prompt": list(range(3, 103)), "max_tokens": 5, "temperature": 0})
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] >= 1
        served_rss = psutil.Process(proc.pid).memory_info().rss
    log = server.log_text()
    print(f"\nstart-up {started:.0f} s, peak RSS during start-up {peak / 2**30:.2f} GiB, "
          f"after serving {served_rss / 2**30:.2f} GiB; 19999+1: {results[19_999][0]:.0f} s, "
          f"19500+500: {results[19_500][0]:.0f} s")
    print("\n".join(line for line in log.splitlines() if "jaxllm.serve" in line))
    assert peak < 3 * 2**30
    assert results[19_999][1] and results[19_500][1]
