"""Start N processes of one jaxllm program on this host, joined into one JAX process group.

    python scripts/launch.py --num-processes 2 -- python my_program.py --args

Each child gets JAXLLM_COORDINATOR_ADDRESS / JAXLLM_NUM_PROCESSES / JAXLLM_PROCESS_ID, which
``jaxllm.runtime.distributed.initialize()`` reads. Across hosts, run one process per host yourself
with those three variables set (the same coordinator address everywhere, ids 0..N-1).
With --cpu-devices-per-process each child simulates that many CPU devices (for testing).

SIGTERM or Ctrl-C goes to process 0 first (a server's leader then stops its followers), and
to the others still running --grace seconds later. When a child fails, the rest are stopped.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--coordinator", help="host:port (default: a free localhost port)")
    parser.add_argument("--cpu-devices-per-process", type=int, default=None)
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds between signalling process 0 and the others")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- program and its args")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the program to run after --")
    if args.num_processes < 1:
        parser.error(f"--num-processes={args.num_processes} must be >= 1")
    coordinator = args.coordinator or f"127.0.0.1:{free_port()}"

    children = []
    for pid in range(args.num_processes):
        env = dict(os.environ, JAXLLM_COORDINATOR_ADDRESS=coordinator,
                   JAXLLM_NUM_PROCESSES=str(args.num_processes), JAXLLM_PROCESS_ID=str(pid))
        if args.cpu_devices_per_process:
            env["JAX_PLATFORMS"] = "cpu"
            env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count="
                                f"{args.cpu_devices_per_process}")
        children.append(subprocess.Popen(command, env=env))
    signal.signal(signal.SIGTERM, _interrupt)
    rc = 0
    try:
        for child in children:
            rc = rc or child.wait()
            if rc:  # one failed: the others would wait for it forever
                _terminate(children[1:], grace=0)
    except KeyboardInterrupt:  # the first failing child's status: 0 when all stopped cleanly
        _terminate(children, grace=args.grace)
        rc = next((c.returncode for c in children if c.returncode), 0)
    return rc


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def _terminate(children: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM to the first child, then, after up to ``grace`` seconds, to the rest."""
    if children and children[0].poll() is None:
        children[0].send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(c.poll() is None for c in children):
        time.sleep(0.1)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        child.wait()


if __name__ == "__main__":
    sys.exit(main())
