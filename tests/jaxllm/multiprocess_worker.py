"""One process of the two-process test: join the group, load on an 8-device mesh, save logits.

    python multiprocess_worker.py CHECKPOINT IDS.npy OUT.npy
"""

import sys

import numpy as np

from jaxllm.runtime import distributed

distributed.initialize()

import jax  # noqa: E402

import jaxllm  # noqa: E402
from jaxllm.sharding import make_mesh  # noqa: E402


def main() -> None:
    checkpoint, ids_path, out_path = sys.argv[1:]
    assert jax.process_count() == 2 and jax.local_device_count() == 4, (
        jax.process_count(), jax.local_device_count())
    mesh = make_mesh(data=2, model=4)
    model = jaxllm.load_model(checkpoint, mesh=mesh)
    embed = model.params["embed"][...]
    assert not embed.is_fully_addressable  # one array spread over both processes
    logits = model.logits(np.load(ids_path))
    if jax.process_index() == 0:
        np.save(out_path, logits)


main()
