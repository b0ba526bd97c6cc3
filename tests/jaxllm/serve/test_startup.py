"""Server start-up: the report, and a second start that compiles nothing."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from tests.support.servers import free_port, wait_healthy


def _start(args: list[str]) -> tuple[str, float]:
    """Starts the server, waits for /health, stops it; returns (its log, seconds to healthy)."""
    port = free_port()
    begin = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "jaxllm.serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(proc, port, 900)
        ready = time.monotonic() - begin
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    return out, ready


def test_second_start_compiles_nothing(tiny_model, tmp_path):
    path = tiny_model("scout")[2]
    args = ["--model", str(path), "--max-model-len", "64", "--max-num-seqs", "2",
            "--max-num-batched-tokens", "32", "--compilation-cache-dir", str(tmp_path / "xla")]
    first, first_s = _start(args)
    second, second_s = _start(args)
    counts = [re.search(r"warm-up: (\d+) step programs .* programs compiled: (\d+), loaded "
                        r"from the compilation cache: (\d+)", log).groups()
              for log in (first, second)]
    print(f"\nfirst start {first_s:.1f} s {counts[0]}; second start {second_s:.1f} s "
          f"{counts[1]}")
    assert counts[0][0] == counts[1][0] == "4"  # token buckets 16, 32 x batch buckets 1, 2
    assert int(counts[0][1]) > 0 and counts[1][1] == "0" and int(counts[1][2]) > 0
    assert second_s < first_s / 2
    assert "Maximum concurrency for 64 tokens per request" in first
