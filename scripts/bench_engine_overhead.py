"""How much of each decode step the host costs the device: the engine against its own program.

    python scripts/bench_engine_overhead.py                 # every table (CPU: ~10 minutes)
    python scripts/bench_engine_overhead.py --no-server --steps 20

For 8, 64 and 256 decoding sequences with mixed sampling parameters (greedy, top-p, top-k,
plain temperature, a presence penalty), with async scheduling off ("sync") and on ("async"):

1. **Stand-in device**: the engine drives a device step that takes a fixed T ms without
   holding the interpreter (a queue that sleeps, as a GPU would run; T = 8 ms is a Scout decode
   step on 8 x H100, T = 2 ms a small model). Printed: the host's milliseconds per step on the
   critical path (wall time per step - T), the device's busy fraction (T x steps / wall) and
   engine tokens/s against the device alone (sequences / T).
2. **Bundled model**: the real compiled step. The peer is the same program run back to back on
   the engine's own last step inputs (the program alone); printed: engine tokens/s, the
   program's, their ratio, and host ms per step on the critical path (engine - program). On a
   CPU the "device" shares the cores with the host, so this ratio understates what a GPU gets.
3. **Server** (``--server``, default on), that many streaming clients at once (SSE, in this
   process; the server in another): output tokens/s, mean inter-token latency, and with the
   stand-in device the device's busy fraction, against the device alone. First the server on
   the stand-in device (T = 8 and 2 ms; the server's own work, detokenization and SSE, shares
   the interpreter with the engine), then on the bundled model's real step.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jaxllm import SamplingParams  # noqa: E402
from jaxllm.engine import Engine  # noqa: E402
from jaxllm.engine.step import TOP_LOGPROBS, Sampled  # noqa: E402
from jaxllm.weights.loading import load_model  # noqa: E402

BUNDLED = REPO / "checkpoints" / "tiny-llama4"
MIXED = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=1.0, top_k=20),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.9, top_p=0.95, min_p=0.02),
    SamplingParams(temperature=0.6, presence_penalty=0.3),
    SamplingParams(temperature=0.0),
]


class StandInDevice:
    """Replaces the runner's ``run``: each step occupies a one-queue device for ``ms``
    milliseconds after the one before it; ``result`` sleeps (releasing the interpreter) until
    the step's end and picks token 5 for every sequence."""

    def __init__(self, ms: float):
        self.seconds = ms / 1e3
        self.free_at = 0.0
        self.busy = 0.0

    def run(self, inputs):
        start = max(time.perf_counter(), self.free_at)
        self.free_at = start + self.seconds
        self.busy += self.seconds
        return _Pending(self.free_at, inputs.num_seqs)


@dataclasses.dataclass
class _Pending:
    end: float
    num_seqs: int

    def result(self):
        time.sleep(max(0.0, self.end - time.perf_counter()))
        n = self.num_seqs
        return Sampled(np.full(n, 5, np.int32), np.zeros(n, np.float32),
                       np.zeros((n, TOP_LOGPROBS), np.int32),
                       np.zeros((n, TOP_LOGPROBS), np.float32)), None


def engine_for(model, seqs: int, async_scheduling: bool) -> Engine:
    # Room for every sequence at max_model_len: no preemption while timing.
    return Engine(model, num_pages=seqs * 64 + 64, async_scheduling=async_scheduling)


def decode(engine: Engine, seqs: int, steps: int, warm_steps: int = 3) -> tuple[float, int]:
    """Admits ``seqs`` short prompts, runs until every one decodes, then times ``steps``
    steps; returns (seconds, tokens produced in them)."""
    rng = np.random.default_rng(0)
    for i in range(seqs):
        sampling = dataclasses.replace(MIXED[i % len(MIXED)], seed=i, max_tokens=200)
        engine.submit(engine.prepare(rng.integers(3, 100, 4).tolist(), sampling,
                                     ignore_eos=True))
    while min((len(r.output) for r in engine.requests.values()), default=0) < warm_steps:
        engine.step()
    tokens = 0
    start = time.perf_counter()
    for _ in range(steps):
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    return time.perf_counter() - start, tokens


def stand_in_table(model, sizes, steps: int) -> list[str]:
    rows = ["| T ms | seqs | mode | host ms/step on the critical path | device busy | "
            "engine tok/s | device alone tok/s | ratio |", "|---|---|---|---|---|---|---|---|"]
    for ms in (8.0, 2.0):
        for seqs in sizes:
            for mode in (False, True):
                engine = engine_for(model, seqs, mode)
                device = StandInDevice(ms)
                engine.runner.run = device.run
                seconds, tokens = decode(engine, seqs, steps)
                busy = steps * device.seconds / seconds
                alone = seqs / device.seconds
                rows.append(f"| {ms:g} | {seqs} | {'async' if mode else 'sync'} | "
                            f"{(seconds / steps - device.seconds) * 1e3:.2f} | {busy:.3f} | "
                            f"{tokens / seconds:,.0f} | {alone:,.0f} | "
                            f"{tokens / seconds / alone:.3f} |")
                print(rows[-1], flush=True)
    return rows


def model_table(model, sizes, steps: int) -> list[str]:
    rows = ["| seqs | mode | engine tok/s | program alone tok/s | ratio | "
            "host ms/step on the critical path |", "|---|---|---|---|---|---|"]
    for seqs in sizes:
        for mode in (False, True):
            engine = engine_for(model, seqs, mode)
            captured = {}
            build = engine.batch.inputs

            def capture(plan, masks=None, *, build=build, captured=captured):
                captured["inputs"] = build(plan, masks)
                return captured["inputs"]

            engine.batch.inputs = capture
            seconds, tokens = decode(engine, seqs, steps)
            # The peer: the same compiled program on the engine's last inputs, back to back.
            inputs, runner = captured["inputs"], engine.runner
            runner.run(inputs).result()
            start = time.perf_counter()
            pending = [runner.run(inputs) for _ in range(steps)]
            pending[-1].result()
            alone = time.perf_counter() - start
            rate, peer = tokens / seconds, seqs * steps / alone
            rows.append(f"| {seqs} | {'async' if mode else 'sync'} | {rate:,.0f} | "
                        f"{peer:,.0f} | {rate / peer:.3f} | "
                        f"{(seconds - alone) / steps * 1e3:.2f} |")
            print(rows[-1], flush=True)
    return rows


def serve_stand_in(ms: float, port: int, async_scheduling: bool, seqs: int,
                   stats: str) -> int:
    """The server on the bundled model with the stand-in device (run by ``--serve-stand-in``
    in a process of its own); SIGUSR1 writes the device's busy seconds to ``stats``."""
    import signal

    import uvicorn

    from jaxllm.serve.__main__ import build_state, parse_args
    from jaxllm.serve.app import build_app

    argv = ["--model", str(BUNDLED), "--port", str(port), "--max-num-seqs", str(seqs),
            "--num-kv-pages", str(seqs * 64 + 64), "--skip-warmup"]
    if not async_scheduling:
        argv.append("--no-async-scheduling")
    state = build_state(parse_args(argv))
    device = StandInDevice(ms)
    state.engine.engine.runner.run = device.run

    def report(*_):  # written whole, then renamed: the reader never sees half of it
        Path(stats + ".part").write_text(f"{device.busy!r}")
        Path(stats + ".part").replace(stats)

    signal.signal(signal.SIGUSR1, report)
    uvicorn.run(build_app(state), host="127.0.0.1", port=port, log_level="warning")
    return 0


async def _clients(url: str, clients: int, output_len: int) -> tuple[list[dict], float]:
    sys.path.insert(0, str(REPO / "scripts"))
    import httpx
    from bench_serving import one_request

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        done = await asyncio.gather(*(
            one_request(client, url, "tiny-llama4", [5 + i % 50, 6], output_len, {})
            for i in range(clients)))
        return done, time.perf_counter() - start


def _served(done: list[dict], seconds: float) -> tuple[int, float, int]:
    """(output tokens, mean inter-token latency in ms, failed requests)."""
    ok = [d for d in done if "error" not in d]
    itl = float(np.mean([x for d in ok for x in d["itl"]])) * 1e3 if ok else float("nan")
    return sum(d["tokens"] for d in ok), itl, len(done) - len(ok)


def _device_busy(proc: subprocess.Popen, stats: Path) -> float:
    """The stand-in server's device-busy seconds so far (``serve_stand_in``)."""
    import os
    import signal

    stats.unlink(missing_ok=True)
    os.kill(proc.pid, signal.SIGUSR1)
    while not stats.exists():
        time.sleep(0.01)
    return float(stats.read_text())


def stand_in_server_table(sizes, output_len: int) -> list[str]:
    from tests.support.servers import free_port, wait_healthy

    rows = ["| T ms | clients | mode | output tok/s | device busy | mean ITL ms | "
            "device alone tok/s | ratio | failed |", "|---|---|---|---|---|---|---|---|---|"]
    for ms in (8.0, 2.0):
        for clients in sizes:
            for mode in (False, True):
                port = free_port()
                with tempfile.TemporaryDirectory() as tmp, \
                        tempfile.TemporaryFile() as log:
                    stats = Path(tmp) / "busy"
                    cmd = [sys.executable, __file__, "--serve-stand-in", f"{ms},{port},"
                           f"{int(mode)},{clients},{stats}"]
                    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
                    try:
                        wait_healthy(proc, port, timeout=600)
                        url = f"http://127.0.0.1:{port}/v1/completions"

                        asyncio.run(_clients(url, clients, 8))  # settles the server
                        before = _device_busy(proc, stats)
                        done, seconds = asyncio.run(_clients(url, clients, output_len))
                        device = _device_busy(proc, stats) - before
                    finally:
                        proc.terminate()
                        proc.wait(timeout=30)
                tokens, itl, failed = _served(done, seconds)
                alone = clients / (ms / 1e3)
                rows.append(f"| {ms:g} | {clients} | {'async' if mode else 'sync'} | "
                            f"{tokens / seconds:,.0f} | {device / seconds:.3f} | {itl:.2f} | "
                            f"{alone:,.0f} | {tokens / seconds / alone:.3f} | {failed} |")
                print(rows[-1], flush=True)
    return rows


def server_table(sizes, output_len: int) -> list[str]:
    from tests.support.servers import free_port, wait_healthy

    rows = ["| clients | mode | output tok/s | mean ITL ms | failed |", "|---|---|---|---|---|"]
    for mode in ("sync", "async"):
        port = free_port()
        # Warmed up: a shape first seen while timing would compile inside the timed run.
        cmd = [sys.executable, "-m", "jaxllm.serve", "--port", str(port), "--max-num-seqs",
               str(max(sizes))]
        if mode == "sync":
            cmd.append("--no-async-scheduling")
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_healthy(proc, port, timeout=1800)  # warm-up compiles every shape
                url = f"http://127.0.0.1:{port}/v1/completions"
                for clients in sizes:
                    asyncio.run(_clients(url, clients, 8))  # settles the server
                    done, seconds = asyncio.run(_clients(url, clients, output_len))
                    tokens, itl, failed = _served(done, seconds)
                    rows.append(f"| {clients} | {mode} | {tokens / seconds:,.0f} | {itl:.1f} | "
                                f"{failed} |")
                    print(rows[-1], flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="8,64,256", help="decoding sequences per run")
    p.add_argument("--steps", type=int, default=40, help="timed steps per run")
    p.add_argument("--server", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--server-sizes", default="8,64")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--stand-in-server-sizes", default="8,64,256")
    p.add_argument("--serve-stand-in", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_stand_in:  # the server process of ``stand_in_server_table``
        ms, port, mode, seqs, stats = args.serve_stand_in.split(",")
        return serve_stand_in(float(ms), int(port), bool(int(mode)), int(seqs), stats)
    sizes = [int(s) for s in args.sizes.split(",")]
    model = load_model(BUNDLED, max_num_seqs=max(sizes))
    print("## Stand-in device step (fixed T ms, the interpreter free)")
    stand_in_table(model, sizes, args.steps * 2)
    print("\n## Bundled model, the real compiled step")
    model_table(model, sizes, args.steps)
    if args.server:
        print("\n## Through the server on the stand-in device (streaming clients)")
        stand_in_server_table([int(s) for s in args.stand_in_server_sizes.split(",")],
                              args.output_len)
        print("\n## Through the server on the bundled model (streaming clients)")
        server_table([int(s) for s in args.server_sizes.split(",")], args.output_len)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
