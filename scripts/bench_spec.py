"""Speculative decoding on the bundled model (n-gram, EAGLE-3): tokens per step and tokens/s.

    python scripts/bench_spec.py [--requests 64] [--k 3] [--max-new-tokens 8] [--head DIR]

For each prompt set of the bundled model's own task (chat-formatted two-digit sums: repeated
digit operands, and sums with zero, whose answer repeats the prompt) and each concurrency
(1, 4, 16 requests in flight, a new one submitted as one finishes), runs the same greedy
requests through a warmed-up engine without speculation (async scheduling on) and with
n-gram drafts (``--speculative-config`` ngram, prompt lookup 1..3) and with the EAGLE-3
head ``--head`` (default ``checkpoints/tiny-llama4-eagle3``, ``scripts/train_eagle_tiny.py``;
left out when it does not exist). Columns: output tokens,
engine steps (programs dispatched), output tokens per step, sequence-steps that verified drafts,
vLLM's mean acceptance length (1 + accepted / sequence-steps with drafts), and output tokens
per second of wall time (compilation excluded). Every run's outputs are checked equal to
the run without speculation.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import time
from pathlib import Path

import jax

import jaxllm
from jaxllm import SamplingParams
from jaxllm.engine import Engine
from jaxllm.engine.spec_decode.config import SpeculativeConfig
from jaxllm.serve.tokenizer import TextCodec

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "checkpoints" / "tiny-llama4"
HEAD = REPO / "checkpoints" / "tiny-llama4-eagle3"
CONCURRENCY = (1, 4, 16)


def prompt_sets(codec: TextCodec, n: int) -> dict[str, list[list[int]]]:
    spec = importlib.util.spec_from_file_location("train_tiny", REPO / "scripts" / "train_tiny.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    rep = [a * 11 for a in range(1, 10)]
    pairs = {"repeated digits": [(a, b) for a in rep for b in rep],
             "x + 0": [(a, 0) for a in range(10, 100)]}

    def encode(a, b):
        return codec.encode(codec.render_chat([{"role": "user", "content": train.question(a, b)}]),
                            add_special_tokens=False)

    return {name: [encode(a, b) for a, b in (p * (n // len(p) + 1))[:n]]
            for name, p in pairs.items()}


def run(engine: Engine, prompts: list[list[int]], concurrency: int, sampling: SamplingParams
        ) -> tuple[list[list[int]], int, float]:
    """Runs ``prompts`` keeping ``concurrency`` in flight: (outputs, steps, seconds)."""
    steps = 0
    dispatch = engine.executor.run

    def counted(inputs):
        nonlocal steps
        steps += 1
        return dispatch(inputs)

    engine.executor.run = counted
    queue = list(enumerate(prompts))
    outputs: dict[str, list[int]] = {}
    order: dict[str, int] = {}
    live = 0
    start = time.perf_counter()
    try:
        while queue or engine.has_unfinished():
            while queue and live < concurrency:
                index, prompt = queue.pop(0)
                rid = engine.add_request(prompt, sampling)
                order[rid], outputs[rid] = index, []
                live += 1
            for out in engine.step():
                outputs[out.request_id] += out.new_token_ids
                live -= out.finished
        seconds = time.perf_counter() - start
    finally:
        engine.executor.run = dispatch
    ranked = sorted(outputs, key=order.__getitem__)
    return [outputs[r] for r in ranked], steps, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--head", type=Path, default=HEAD, help="an EAGLE-3 head's directory")
    args = parser.parse_args()
    model = jaxllm.load_model(BUNDLED, max_model_len=64, max_num_seqs=max(CONCURRENCY))
    codec = TextCodec.from_dir(BUNDLED)
    ngram = SpeculativeConfig(method="ngram", num_speculative_tokens=args.k,
                              prompt_lookup_min=1, prompt_lookup_max=3)
    configs: dict[str, SpeculativeConfig | None] = {"none": None, "ngram": ngram}
    if (args.head / "config.json").exists():
        configs["eagle3"] = SpeculativeConfig(method="eagle3", model=str(args.head),
                                              num_speculative_tokens=args.k)
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)
    sets = prompt_sets(codec, args.requests)
    # One engine at a time, its programs freed before the next is warmed up: three warmed-up
    # engines of the multimodal bundled model hold more compiled code than a process may map.
    lines, outputs = {}, {}
    for method, speculative in configs.items():
        engine = Engine(model, num_pages=512, speculative=speculative)
        engine.warmup(progress=False)
        stats = engine.speculator.stats if engine.speculator else None
        for name, prompts in sets.items():
            for concurrency in CONCURRENCY:
                before = (stats.num_drafts, stats.num_accepted_tokens) if stats else (0, 0)
                got, steps, seconds = run(engine, prompts, concurrency, sampling)
                outputs[name, concurrency, method] = got
                tokens = sum(len(o) for o in got)
                drafts = stats.num_drafts - before[0] if stats else 0
                accepted = stats.num_accepted_tokens - before[1] if stats else 0
                al = f"{1 + accepted / drafts:5.2f}" if drafts else "    -"
                lines[name, concurrency, method] = (
                    f"{name:<16} {concurrency:>4} {method:>6} {tokens:>6} {steps:>5} "
                    f"{tokens / steps:>8.3f} {drafts:>10} {al} {tokens / seconds:>8.1f}")
        del engine
        gc.collect()
        jax.clear_caches()
    print(f"# bundled model {BUNDLED.name}, {jax.devices()[0].platform}, {args.requests} greedy "
          f"requests per row, k={args.k}, prompt lookup 1..3"
          + (f", EAGLE-3 head {args.head.name}" if "eagle3" in configs else ""))
    print(f"{'prompts':<16} {'conc':>4} {'method':>6} {'tokens':>6} {'steps':>5} "
          f"{'tok/step':>8} {'drafted':>10} {'AL':>5} {'tok/s':>8}")
    for name in sets:
        for concurrency in CONCURRENCY:
            for method in configs:
                print(lines[name, concurrency, method])
                if outputs[name, concurrency, method] != outputs[name, concurrency, "none"]:
                    raise SystemExit(f"{name}, concurrency {concurrency}: outputs differ with "
                                     f"{method} speculation")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
