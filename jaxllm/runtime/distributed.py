"""Multi-process JAX: one device mesh spanning processes and hosts.

Each process calls ``initialize()`` before touching any device. Values come from arguments,
else from the environment (what ``scripts/launch.py`` sets, or your cluster launcher):

    JAXLLM_COORDINATOR_ADDRESS  host:port of process 0's coordinator
    JAXLLM_NUM_PROCESSES        total number of processes
    JAXLLM_PROCESS_ID           this process's index, 0 .. N-1
"""

from __future__ import annotations

import os

import jax

ENV_COORDINATOR = "JAXLLM_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAXLLM_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXLLM_PROCESS_ID"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins the process group; returns False (and does nothing) for a single process."""
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    num_processes = num_processes or _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if not num_processes or num_processes == 1:
        return False
    if coordinator_address is None or process_id is None:
        raise ValueError(
            f"multi-process run of {num_processes} processes needs a coordinator address and a "
            f"process id (flags, or {ENV_COORDINATOR} / {ENV_PROCESS_ID})")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} outside [0, {num_processes})")
    # CPU devices need an explicit cross-process collectives backend; GPUs use NCCL.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True


def shutdown() -> None:
    """Leaves the process group once every process does (a barrier), so that no process
    exits while another still talks to it."""
    jax.distributed.shutdown()


def is_follower() -> bool:
    """Whether this process follows process 0 (which alone serves and schedules)."""
    return jax.process_index() != 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None
