"""Real ``python -m jaxllm.serve`` processes for tests and benchmarks: a free port, waiting
for /health, a server for the length of a ``with`` block (the benchmarks), and the test
session's pool of servers (``ServerPool``, the ``server_pool`` fixture) with the guard that keeps
tests from starting servers of their own."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import subprocess
import sys
import threading
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
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jaxllm.serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    try:
        wait_healthy(proc, port, timeout)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --- the test session's servers ----------------------------------------------------------------

_LAUNCHING = threading.local()  # set while a ServerPool starts a process: the guard lets it by


def launches_a_server(argv: Any) -> bool:
    """Whether a command line runs ``python -m jaxllm.serve`` to serve (directly or behind
    ``scripts/launch.py``); ``--dry-run`` and ``--help`` plan or print and exit."""
    args = [str(a) for a in argv] if isinstance(argv, list | tuple) else str(argv).split()
    serves = any(a == "-m" and b == "jaxllm.serve" for a, b in zip(args, args[1:], strict=False))
    return serves and not {"--dry-run", "--help", "-h"} & set(args)


def guard_popen(popen_init):
    """Wraps ``subprocess.Popen.__init__``: a server started anywhere but through the
    ``server_pool`` fixture (a ``ServerPool``) is an error, so that no test quietly brings back a
    server of its own (each costs a start-up's compilation)."""

    def init(self, args, *rest, **kwargs):
        if launches_a_server(args) and not getattr(_LAUNCHING, "on", False):
            raise RuntimeError(
                "this test starts `python -m jaxllm.serve` itself: take a shared server from "
                "the `server_pool` fixture (server_pool.shared(flags)), or, for a test of start-up "
                "or of a server's death, server_pool.private(flags, reason=...) "
                "(tests/support/servers.py)")
        return popen_init(self, args, *rest, **kwargs)

    return init


@dataclasses.dataclass
class Server:
    """A running ``python -m jaxllm.serve``: its URL, port, process and log file."""

    url: str
    port: int
    proc: subprocess.Popen
    log: Path
    args: tuple[str, ...]
    peak_rss: int = 0  # bytes, while starting (``ServerPool.private(track_rss=True)``)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self, api_key: str = "none") -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


class ServerPool:
    """The real servers of one test session. ``shared(flags)`` starts ``python -m jaxllm.serve
    FLAGS`` on first use and hands the same process to every later test that asks for the same
    flags, in any module; at most ``max_live`` shared servers run at once (the least recently
    used one stops first, and starts again if asked for). ``private(flags, reason=...)`` is a
    server of the test's own for the length of a ``with`` block: for tests of start-up itself,
    of a second start, of a server that is made to die. Servers use the persistent compilation
    cache (``~/.cache/jaxllm/xla`` unless their flags name another), so a program one server
    compiled is loaded, not compiled, by the next that runs it."""

    last: ServerPool | None = None  # the session's, for the end-of-session summary

    def __init__(self, root: Path, max_live: int = 3, timeout: float = 900):
        self.root, self.max_live, self.timeout = root, max_live, timeout
        self.live: collections.OrderedDict[tuple[str, ...], Server] = collections.OrderedDict()
        self.flag_sets: set[tuple[str, ...]] = set()
        self.starts = self.restarts = 0
        ServerPool.last = self

    def shared(self, flags: list[str] | tuple[str, ...], cwd: Path | None = None) -> Server:
        key = (*map(str, flags), f"cwd={cwd}")
        server = self.live.get(key)
        if server is not None and server.proc.poll() is None:
            self.live.move_to_end(key)
            return server
        if server is not None:  # it died: a test killed it, or it crashed; start another
            del self.live[key]
        while len(self.live) >= self.max_live:
            self.live.popitem(last=False)[1].stop()
        self.restarts += key in self.flag_sets
        self.flag_sets.add(key)
        self.live[key] = self.start(flags, cwd)
        return self.live[key]

    @contextlib.contextmanager
    def private(self, flags: list[str], *, reason: str, cwd: Path | None = None,
                command: list[str] | None = None, track_rss: bool = False):
        """A server of this test's own (``reason``: why a shared one will not do);
        ``command`` replaces ``python -m jaxllm.serve`` (``scripts/launch.py ...``);
        ``track_rss``: ``server.peak_rss`` is its peak RSS until /health answered."""
        assert reason, "say why this test needs a server of its own"
        server = self.start(flags, cwd, command, track_rss)
        try:
            yield server
        finally:
            server.stop()

    def start(self, flags, cwd: Path | None = None, command: list[str] | None = None,
              track_rss: bool = False) -> Server:
        port = free_port()
        self.starts += 1
        log = self.root / f"server{self.starts}.log"
        args = [*map(str, flags), "--port", str(port)]
        cmd = [*(command or [sys.executable, "-m", "jaxllm.serve"]), *args]
        _LAUNCHING.on = True
        try:
            with log.open("w") as out:  # a file: a pipe nobody reads could block the server
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        finally:
            _LAUNCHING.on = False
        server = Server(f"http://127.0.0.1:{port}", port, proc, log, tuple(args))
        try:
            server.peak_rss = wait_healthy(proc, port, self.timeout, log=server.log_text,
                                           track_rss=track_rss)
        except BaseException:
            server.stop()
            raise
        return server

    def close(self) -> None:
        while self.live:
            self.live.popitem()[1].stop()
