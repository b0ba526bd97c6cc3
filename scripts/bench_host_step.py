"""The host's share of a decode step at long contexts: scheduling, the step's arrays (block
tables, slots, checks) and the bookkeeping after it, for 8 sequences of 32k to 1M tokens.

    python scripts/bench_host_step.py [--seqs 8] [--lengths 32768 131072 1000000]

No model runs: the engine's own host code (``Scheduler``, the persistent batch's
``InputBatch.inputs`` as the engine calls it, ``Scheduler.settle``) is timed on requests
whose prompts are already in the cache, on Scout's layout (page 16, chunk 8192, one global
group and three chunked ones, hybrid cache). The peer is the floor any design pays: copying
the step's block tables once (they are what crosses to the device). A Scout decode step on
8xH100 at 1M tokens reads ~50 GB of KV per GPU, ~15-30 ms: the host must stay well under.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax.numpy as jnp
import numpy as np

from jaxllm.buckets import BucketPolicy
from jaxllm.engine.batch import InputBatch, SlotPlan
from jaxllm.engine.pages import PageAllocator
from jaxllm.engine.request import Request, Status
from jaxllm.engine.scheduler import Scheduler
from jaxllm.kv_cache import CacheConfig
from jaxllm.layout import SeqPiece
from jaxllm.sample.sampling import GREEDY

PAGE, CHUNK = 16, 8192
GROUP_CHUNK = (None, CHUNK, CHUNK, CHUNK)  # Scout: 12 global layers, 36 chunked, 4 groups


def setup(length: int, seqs: int, prompt: int | None = None
          ) -> tuple[Scheduler, BucketPolicy, list[Request]]:
    """A scheduler whose ``seqs`` requests of ``prompt`` (default ``length``) prompt tokens
    are all in the cache (as after their prefill), each about to decode, under a
    max_model_len of ``length``."""
    # Pages per sequence: its whole length in the global group, a chunk (and the pages the
    # step's rows reach past it) in each chunked group.
    prompt = length if prompt is None else prompt
    pages_per_seq = -(-(prompt + 64) // PAGE) + 3 * (2 * CHUNK // PAGE)
    cache = CacheConfig(page_size=PAGE, dtype=jnp.bfloat16, num_pages=seqs * pages_per_seq,
                        hybrid=True)
    policy = BucketPolicy(max_model_len=length + 64, max_num_seqs=seqs,
                          max_num_batched_tokens=CHUNK, cache=cache)
    allocator = PageAllocator(cache, GROUP_CHUNK)
    scheduler = Scheduler(policy, allocator)
    rng = np.random.default_rng(0)
    requests = []
    for i in range(seqs):
        request = Request(f"r{i}", rng.integers(3, 200_000, prompt).tolist(),
                          dataclasses.replace(GREEDY, max_tokens=64, seed=i))
        scheduler.add(request)
        requests.append(request)
    # Admit and "prefill" every request through the scheduler's own bookkeeping, one chunk
    # at a time, without building device arrays.
    while any(r.num_computed < len(r.prompt) for r in requests):
        for scheduled in scheduler.schedule():
            scheduler.settle(scheduled)
            scheduled.request.num_in_flight = 0
    for r in requests:
        r.output.append(7)
        assert r.status is Status.RUNNING
    assert scheduler.num_preemptions == 0
    return scheduler, policy, requests


def bind(batch: InputBatch, requests: list[Request]) -> None:
    """What admission does: each request's rows of the persistent batch, pages included."""
    for r in requests:
        batch.write(r.batch_row, r.sampling, (), r.pages)


def decode_step(scheduler: Scheduler, batch: InputBatch) -> tuple[float, int]:
    """One decode step's host work; (seconds, block-table bytes)."""
    start = time.perf_counter()
    scheduled = scheduler.schedule()
    plans = [SlotPlan(SeqPiece(s.request.pages, s.start, s.request.tokens_between(
        s.start, s.start + s.num_tokens)), s.request.batch_row, len(s.request.output), False,
        len(s.request.prompt)) for s in scheduled]
    inputs = batch.inputs(plans, bound=True)
    for s in scheduled:
        scheduler.settle(s)
        s.request.num_in_flight = 0
        s.request.output.append(7)
    return time.perf_counter() - start, inputs.meta.block_tables.nbytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072, 1_000_000])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompt", type=int, default=None,
                        help="prompt tokens per sequence (default: the context); e.g. 100 "
                        "with --seqs 256: many short sequences under a long max_model_len")
    args = parser.parse_args()
    print(f"{args.seqs} sequences decoding; page {PAGE}, chunk {CHUNK}, 4 layer groups"
          + (f"; prompts of {args.prompt} tokens, the context is max_model_len"
             if args.prompt else ""))
    print(f"{'context':>9} {'tables MiB':>10} {'host ms/step':>13} {'copy ms':>8} "
          f"{'host/copy':>9}")
    for length in args.lengths:
        scheduler, policy, requests = setup(length, args.seqs, args.prompt)
        batch = InputBatch(policy, GROUP_CHUNK, mask_words=1)
        bind(batch, requests)
        times, nbytes = [], 0
        for _ in range(args.steps):
            seconds, nbytes = decode_step(scheduler, batch)
            times.append(seconds)
        tables = np.zeros(nbytes // 4, np.int32)
        start = time.perf_counter()
        for _ in range(args.steps):
            tables.copy()
        copy = (time.perf_counter() - start) / args.steps
        host = float(np.median(times))
        print(f"{length:>9,} {nbytes / 2**20:>10.1f} {1e3 * host:>13.1f} {1e3 * copy:>8.2f} "
              f"{host / copy:>9.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
