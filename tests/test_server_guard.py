"""The guard in conftest.py: a test that starts ``python -m jaxllm.serve`` itself fails; the
session's ``server_pool`` is the one way to a real server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.servers import launches_a_server


def test_recognises_every_way_of_starting_a_server():
    python = sys.executable
    assert launches_a_server([python, "-m", "jaxllm.serve", "--port", "1"])
    assert launches_a_server(f"{python} -m jaxllm.serve --model m")
    assert launches_a_server([python, "scripts/launch.py", "--num-processes", "2", "--",
                              python, "-m", "jaxllm.serve"])
    assert not launches_a_server([python, "-m", "jaxllm.serve", "--model", "m", "--dry-run"])
    assert not launches_a_server([python, "-m", "jaxllm.serve", "--help"])
    assert not launches_a_server([python, "scripts/convert_hf_to_orbax.py"])


def test_a_server_started_outside_the_pool_fails_before_it_runs():
    with pytest.raises(RuntimeError, match="take a shared server from the `server_pool`"):
        subprocess.Popen([sys.executable, "-m", "jaxllm.serve", "--port", "1"])
    # Other subprocesses are untouched.
    assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True,
                          text=True).stdout == "1\n"
