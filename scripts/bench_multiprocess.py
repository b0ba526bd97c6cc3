"""Step time of the engine across processes, and what broadcasting each step's inputs costs.

    # 2 processes x 4 CPU devices (the leader broadcasts every step)
    python scripts/launch.py --num-processes 2 --cpu-devices-per-process 4 -- \\
        python scripts/bench_multiprocess.py
    # the same mesh in one process: no broadcast
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_multiprocess.py

Process 0 prints one row per step shape: the median step (broadcast + the compiled step, as
``Executor.run`` runs it) and the median broadcast alone (header + inputs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from jaxllm.runtime import distributed

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-llama4"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    multi = distributed.initialize()

    import jax

    import jaxllm
    from jaxllm.engine import Engine
    from jaxllm.layout import SeqPiece

    mesh = jaxllm.make_mesh(model=jax.device_count())
    model = jaxllm.load_model(args.model, mesh=mesh, max_model_len=64, max_num_seqs=2,
                              max_num_batched_tokens=32)
    engine = Engine(model, num_pages=16)
    groups = engine.groups.num_groups
    shapes = {  # name: chunks (pages per layer group, cached tokens, new tokens)
        "decode, 2 x 1 token": [SeqPiece([[1, 2]] * groups, 20, [7]),
                                SeqPiece([[3, 4]] * groups, 20, [8])],
        "prefill, 1 x 32 tokens": [SeqPiece([[5, 6]] * groups, 0, list(range(32)))],
    }
    leader = jax.process_index() == 0
    rows = []
    for name, chunks in shapes.items():
        rows.append((name, *_measure(engine, chunks, multi, leader, args.repeats)))
    if leader:
        devices = f"{jax.process_count()} x {jax.local_device_count()} {jax.default_backend()}"
        print("\n| processes x devices | step shape | step ms | broadcast ms |\n|---|---|---|---|")
        for name, step_ms, broadcast_ms in rows:
            print(f"| {devices} | {name} | {step_ms:.2f} | {broadcast_ms:.2f} |")
    if multi:
        distributed.shutdown()


def _measure(engine, chunks, multi: bool, leader: bool, repeats: int) -> tuple[float, float]:
    """(median step ms, median broadcast ms) of one step shape."""
    import numpy as np
    from jax.experimental import multihost_utils

    from jaxllm.engine.batch import inputs_for
    from jaxllm.engine.executor import pack, unpack
    from jaxllm.sample.sampling import SamplingParams

    n = len(chunks)
    inputs = inputs_for(engine.batch, chunks, [SamplingParams(temperature=0.0, seed=0)] * n)
    if not leader:  # the same shapes, zeros: what a follower receives into
        inputs = engine.runner.empty_inputs(inputs.tokens.shape[0], inputs.logits_rows.shape[0])
    header = np.array([1, inputs.tokens.shape[0], inputs.logits_rows.shape[0]], np.int32)

    def broadcast() -> None:
        multihost_utils.broadcast_one_to_all(header)
        unpack(multihost_utils.broadcast_one_to_all(pack(inputs)), inputs)

    def step() -> None:
        if multi:
            broadcast()
        engine.runner.run(inputs).result()

    return _median_ms(step, repeats), _median_ms(broadcast, repeats) if multi else 0.0


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):  # compile and settle
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


if __name__ == "__main__":
    main()
