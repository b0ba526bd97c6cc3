"""Server start-up: the report, and a second start that compiles nothing."""

from __future__ import annotations

import re
import time


def _start(pool, args: list[str]) -> tuple[str, float]:
    """Starts the server, waits for /health, stops it; returns (its log, seconds to healthy)."""
    begin = time.monotonic()
    with pool.private(args, reason="a cold start and a warm one are what is tested") as server:
        ready = time.monotonic() - begin
    return server.log_text(), ready


def test_second_start_compiles_nothing(tiny_model, tmp_path, server_pool):
    path = tiny_model("scout")[2]
    args = ["--model", str(path), "--max-model-len", "64", "--max-num-seqs", "2",
            "--max-num-batched-tokens", "32", "--compilation-cache-dir", str(tmp_path / "xla")]
    first, first_s = _start(server_pool, args)
    second, second_s = _start(server_pool, args)
    counts = [re.search(r"warm-up: (\d+) step programs .* programs compiled: (\d+), loaded "
                        r"from the compilation cache: (\d+)", log).groups()
              for log in (first, second)]
    print(f"\nfirst start {first_s:.1f} s {counts[0]}; second start {second_s:.1f} s "
          f"{counts[1]}")
    assert counts[0][0] == counts[1][0] == "4"  # token buckets 16, 32 x batch buckets 1, 2
    assert int(counts[0][1]) > 0 and counts[1][1] == "0" and int(counts[1][2]) > 0
    assert second_s < first_s / 2
    assert "Maximum concurrency for 64 tokens per request" in first
