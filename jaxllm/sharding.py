"""The device mesh and the one table that maps logical axes to mesh axes.

Every parameter declares logical axes (``jaxllm.model.llama4``); activations and the KV cache
use the same names. Changing the parallelism means changing ``LOGICAL_AXIS_RULES`` and nothing else.
A dimension that its mesh axis does not divide is replicated instead, except the vocabulary,
which is padded to a multiple of its axis (``padded_vocab_size``) so it can always be split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "expert", "model")

LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "vocab": "model",
    "embed": None,
    "heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "ffn": "model",
    "experts": "expert",
    "tokens": "data",  # the flat token batch of a step
    "pages": None,
    "page_slots": None,
    # The vision tower (jaxllm.model.vision): tensor-parallel over heads and MLP widths like
    # the text model. For a data-parallel encoder map "tiles" to "data" and these to None.
    "tiles": None,
    "vision_embed": None,
    "vision_heads": "model",
    "vision_head_dim": None,
    "vision_ffn": "model",
    "vision_patch": None,
}


def make_mesh(
    data: int = 1, model: int = 1, expert: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh with axes ("data", "expert", "model") over ``devices`` (default: all of them)."""
    devices = list(jax.devices() if devices is None else devices)
    for name, size in (("data", data), ("model", model), ("expert", expert)):
        if size < 1:
            raise ValueError(f"mesh axis {name}={size} must be >= 1")
    if data * expert * model != len(devices):
        raise ValueError(
            f"mesh data={data} x expert={expert} x model={model} = {data * expert * model} "
            f"devices, but {len(devices)} devices are in use")
    grid = np.asarray(devices, dtype=object).reshape(data, expert, model)
    return Mesh(grid, MESH_AXES)


def axis_size(mesh: Mesh | None, axis: str | None) -> int:
    if mesh is None or axis is None:
        return 1
    return int(mesh.shape[axis])


def padded_vocab_size(vocab_size: int, mesh: Mesh | None) -> int:
    """Vocabulary rounded up to a multiple of the mesh axis that splits it."""
    n = axis_size(mesh, LOGICAL_AXIS_RULES["vocab"])
    return -(-vocab_size // n) * n


def logical_spec(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh | None
) -> PartitionSpec:
    """PartitionSpec for an array with ``axes``: each dim on its mesh axis when that divides it."""
    spec: list[str | None] = []
    used: set[str] = set()
    for name, dim in zip(axes, shape, strict=True):
        axis = LOGICAL_AXIS_RULES.get(name) if name else None
        size = axis_size(mesh, axis)
        if axis is None or size == 1 or dim % size or axis in used:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return PartitionSpec(*spec)


def named_sharding(
    axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh | None
) -> jax.sharding.Sharding:
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, logical_spec(axes, shape, mesh))


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
    """Pins an activation's sharding (a no-op without a mesh)."""
    if mesh is None or math.prod(mesh.shape.values()) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(axes, x.shape,
                                                                                mesh)))


def shard_axes(spec: PartitionSpec) -> tuple[str, ...]:
    """Mesh axes that actually split an array with ``spec``."""
    return tuple(a for a in spec if a is not None)


def param_shardings(params: Any, mesh: Mesh | None) -> Any:
    """The sharding of every parameter (an ``nnx.State``), from its declared logical axes."""
    from flax import nnx

    return jax.tree.map(
        lambda v: named_sharding(v.get_metadata()["logical_axes"], v.shape, mesh), params,
        is_leaf=lambda v: isinstance(v, nnx.Variable))


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) array as one numpy array on this host."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:  # every process holds all of it: no collective needed
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
