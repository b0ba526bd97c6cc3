"""Serving benchmark: load an OpenAI-compatible server and report throughput and latency.

    python scripts/bench_serving.py                    # starts a tiny random model itself
    python scripts/bench_serving.py --base-url http://127.0.0.1:8000 --model NAME \
        --num-prompts 200 --input-len 512 --output-len 128 --request-rate 8

Sends streaming /v1/completions requests of random token ids (EOS ignored, so each makes
exactly --output-len tokens) at --request-rate per second (Poisson; inf: all at once) and
prints request / output / total token throughput and mean, median and p99 of TTFT,
TPOT = (latency - TTFT) / (output tokens - 1), ITL and end-to-end latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support: test helpers

import httpx
import numpy as np


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int],
                      output_len: int, headers: dict) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, tokens = [], 0
    async with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            return {"error": (await response.aread()).decode()}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices"):
                arrivals.append(time.perf_counter())
    end = time.perf_counter()
    if not arrivals:
        return {"error": "no tokens"}
    return {"ttft": arrivals[0] - start, "latency": end - start, "tokens": tokens,
            "itl": list(np.diff(arrivals))}


async def run(args, base_url: str, model: str) -> None:
    rng = np.random.default_rng(0)
    prompts = rng.integers(10, args.vocab_size, (args.num_prompts, args.input_len)).tolist()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = f"{base_url}/v1/completions"
    limit = asyncio.Semaphore(args.max_concurrency or args.num_prompts)
    async with httpx.AsyncClient(timeout=None) as client:
        async def limited(prompt):
            async with limit:
                return await one_request(client, url, model, prompt, args.output_len, headers)

        await limited(prompts[0])  # warm-up: compiles the first shapes
        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    report(args, [r for r in results if "error" not in r], results, duration)


def report(args, ok: list[dict], results: list[dict], duration: float) -> None:
    errors = [r["error"] for r in results if "error" in r]
    out_tokens = sum(r["tokens"] for r in ok)
    in_tokens = len(ok) * args.input_len
    ms = lambda xs: [1000 * x for x in xs]  # noqa: E731
    series = {
        "TTFT (ms)": ms([r["ttft"] for r in ok]),
        "TPOT (ms)": ms([(r["latency"] - r["ttft"]) / (r["tokens"] - 1)
                         for r in ok if r["tokens"] > 1]),
        "ITL (ms)": ms([x for r in ok for x in r["itl"]]),
        "E2E latency (ms)": ms([r["latency"] for r in ok]),
    }
    print(f"requests: {len(ok)} ok, {len(errors)} failed; input {args.input_len}, output "
          f"{args.output_len} tokens; rate {args.request_rate}/s; duration {duration:.2f} s")
    if errors:
        print(f"first error: {errors[0][:300]}")
    print(f"{'request throughput (req/s)':<34}{len(ok) / duration:>12.2f}")
    print(f"{'output token throughput (tok/s)':<34}{out_tokens / duration:>12.1f}")
    print(f"{'total token throughput (tok/s)':<34}{(in_tokens + out_tokens) / duration:>12.1f}")
    print(f"{'metric':<20}{'mean':>12}{'median':>12}{'p99':>12}")
    for name, xs in series.items():
        if xs:
            print(f"{name:<20}{np.mean(xs):>12.2f}{np.median(xs):>12.2f}"
                  f"{np.percentile(xs, 99):>12.2f}")


def tiny_checkpoint(tmp: Path) -> Path:
    """A tiny random Llama 4, converted (for CPU demos)."""
    from tests.support import hf_models

    hf = hf_models.make_text_model(hf_models.SCOUT_LIKE)
    hf_models.save(hf, tmp / "hf", shard_size="1GB")
    converter = Path(__file__).resolve().parent / "convert_hf_to_orbax.py"
    subprocess.run([sys.executable, str(converter), "--hf-dir", str(tmp / "hf"), "--out",
                    str(tmp / "tiny"), "--no-progress"], check=True, capture_output=True)
    return tmp / "tiny"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default=None, help="a running server (default: start one)")
    p.add_argument("--model", default=None, help="served model name")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=300, help="prompt ids are drawn below it")
    args = p.parse_args()
    if args.base_url:
        asyncio.run(run(args, args.base_url.rstrip("/"), args.model))
        return 0

    from tests.support import servers

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = tiny_checkpoint(Path(tmp))
        serve_args = ["--model", str(ckpt), "--max-model-len",
                      str(args.input_len + args.output_len), "--max-num-seqs", "8"]
        with servers.serving(serve_args) as base:
            asyncio.run(run(args, base, "tiny"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
