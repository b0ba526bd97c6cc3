"""Real ``python -m jaxllm.serve`` processes for tests and benchmarks: a free port, waiting
for /health, and a server for the length of a ``with`` block."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: Any, port: int, timeout: float = 300, *, log: Any = None,
                 track_rss: bool = False) -> int:
    """Polls the server of ``proc`` on ``port`` until /health answers 200; kills it and raises
    RuntimeError with its output (``log()``, default its stdout) if it exits or ``timeout``
    passes first. Returns the peak RSS of ``proc`` seen meanwhile (0 unless ``track_rss``)."""
    import time

    import httpx

    deadline, peak = time.monotonic() + timeout, 0
    while True:
        if track_rss:
            import psutil

            peak = max(peak, psutil.Process(proc.pid).memory_info().rss)
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return peak
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            output = log() if log is not None else proc.stdout.read()
            raise RuntimeError(f"server did not start:\n{output}")
        time.sleep(0.2)


@contextlib.contextmanager
def serving(args: list[str], cwd: Path | None = None, timeout: float = 300):
    """Runs ``python -m jaxllm.serve ARGS --port <free>`` until /health answers; yields the
    base URL and stops the server afterwards."""
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jaxllm.serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    try:
        wait_healthy(proc, port, timeout)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
