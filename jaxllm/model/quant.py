"""Quantized feed-forward weights and the matmuls that read them.

Glossary: T tokens (rows), D in features (contracted), F out features, E experts, G groups of
``group_size`` in features.

Schemes (``QuantConfig.scheme``), each a weight ``q [..., D, F]`` plus float32 ``scale``:

- ``fp8``  W8A8: e4m3 weights, one scale per out channel (``scale [..., F]``); activations
  quantized to e4m3 per row (token) at run time. The dot runs fp8 x fp8 with float32
  accumulation and the row and column scales are applied after: exact, since both factor out
  of the sum over D.
- ``int8`` weight only: int8 weights, one scale per out channel (``scale [..., F]``), the int8
  weight converted inside the dot and the scale applied after (exact for the same reason).
- ``int4`` weight only: int4 weights, one scale per ``group_size`` in features and out channel
  (``scale [..., G, F]``), dequantized inside the matmul's fusion (no dequantized copy is a
  parameter, so none lives in HBM between steps); the routed experts' grouped GEMM on a GPU
  is ``pallas_kernels.grouped_matmul``, which widens the packed nibbles in registers.

Scope (``QuantConfig.targets``): the weights Meta quantizes, the routed and the shared experts
(``"routed"``, ``"shared"``), by default; ``"dense"`` widens it to the dense FFN layers
(``--quantization-scope ffn``). Attention, router, embeddings and lm_head stay in the model
dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm.sharding import LOGICAL_AXIS_RULES, axis_size, logical_spec
from pallas_kernels import grouped_matmul, targets_gpu

SCHEMES = ("fp8", "int8", "int4")
TARGETS = ("routed", "shared", "dense")
SCOPES = {"experts": ("routed", "shared"), "ffn": ("routed", "shared", "dense")}
DEFAULT_GROUP_SIZE = 128
FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
INT_MAX = {"int8": 127, "int4": 7}
STORAGE = {"fp8": FP8, "int8": jnp.int8, "int4": jnp.int4}


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Which feed-forward weights are quantized, and how (see the module docstring)."""

    scheme: str
    targets: tuple[str, ...] = SCOPES["experts"]
    group_size: int = DEFAULT_GROUP_SIZE  # int4 only

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantization scheme {self.scheme!r}: expected one of {SCHEMES}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"quantization targets {self.targets}: expected some of {TARGETS}")
        if self.group_size < 1:
            raise ValueError(f"quantization group_size={self.group_size} must be >= 1")

    @classmethod
    def from_flags(cls, scheme: str | None, scope: str = "experts",
                   group_size: int = DEFAULT_GROUP_SIZE) -> QuantConfig | None:
        """``--quantization`` / ``--quantization-scope`` as a config (None: no quantization)."""
        if scheme is None:
            return None
        if scope not in SCOPES:
            raise ValueError(f"quantization scope {scope!r}: expected one of {sorted(SCOPES)}")
        return cls(scheme, SCOPES[scope], group_size)

    def to_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "targets": list(self.targets),
                "group_size": self.group_size}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> QuantConfig | None:
        if data is None:
            return None
        return cls(data["scheme"], tuple(data["targets"]), int(data["group_size"]))

    def covers(self, target: str) -> bool:
        return target in self.targets

    def describe(self) -> str:
        detail = {"fp8": "e4m3 weights per out channel, e4m3 activations per token",
                  "int8": "int8 weights per out channel, weight only",
                  "int4": f"int4 weights in groups of {self.group_size}, weight only"}
        return f"{self.scheme} ({detail[self.scheme]})"


def for_target(quant: QuantConfig | None, target: str) -> QuantConfig | None:
    """``quant`` if it covers ``target`` (``"routed"``, ``"shared"``, ``"dense"``), else None."""
    return quant if quant is not None and quant.covers(target) else None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized weight as the matmuls take it: ``q [..., D, F]`` and its ``scale``."""

    q: jax.Array
    scale: jax.Array
    scheme: str = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))


def scale_shape(shape: tuple[int, ...], scheme: str, group_size: int) -> tuple[int, ...]:
    """The scale's shape for a weight of ``shape [..., D, F]`` (int4: ``ceil(D / group)``
    groups, the last one possibly short)."""
    *lead, d, f = shape
    if scheme != "int4":
        return (*lead, f)
    return (*lead, -(-d // group_size), f)


def quantized_axes(axes: tuple[str | None, ...], scheme: str) -> tuple[tuple, tuple]:
    """Logical axes of ``q`` and of ``scale`` for a weight with ``axes`` over ``[..., D, F]``:
    the scales are split with their channels (and int4's groups with their rows)."""
    *lead, d_axis, f_axis = axes
    if scheme == "int4":
        return tuple(axes), tuple(axes)
    return tuple(axes), (*lead, f_axis)


def ffn_axis(hidden: int, quant: QuantConfig | None, mesh: Mesh | None) -> str | None:
    """The logical axis of an ffn dimension of ``hidden`` features: ``"ffn"``, or None (kept
    whole) when an int4 down projection's groups cannot be split where its rows are, so that
    each shard holds the scales of its own rows and gate, up and down split alike."""
    if quant is None or quant.scheme != "int4":
        return "ffn"
    n = axis_size(mesh, LOGICAL_AXIS_RULES["ffn"])
    return "ffn" if hidden % (n * quant.group_size) == 0 else None


def scale_dtype(scheme: str, dtype: Any) -> Any:
    """Scales are float32 for fp8 (they multiply float32 accumulators) and the model dtype
    for the weight-only schemes (as compressed-tensors stores them; bf16 halves int4's
    scale overhead: 2 / 128 bytes per weight instead of 4 / 128)."""
    return jnp.float32 if scheme == "fp8" else dtype


class QuantWeight(nnx.Module):
    """A quantized ``[..., D, F]`` weight: parameters ``q`` and ``scale`` (``scale_dtype``)."""

    def __init__(self, value: jax.Array, axes: tuple[str | None, ...], quant: QuantConfig,
                 dtype: Any):
        self.scheme, self.group_size = quant.scheme, quant.group_size
        q_axes, s_axes = quantized_axes(axes, quant.scheme)
        q, scale = quantize(value, quant.scheme, quant.group_size)
        self.q = nnx.Param(q, logical_axes=q_axes)
        self.scale = nnx.Param(scale.astype(scale_dtype(quant.scheme, dtype)),
                               logical_axes=s_axes)

    def __getitem__(self, index) -> QArray:
        return QArray(self.q[...], self.scale[...], self.scheme, self.group_size)


def _axes(var: nnx.Variable) -> tuple[str | None, ...]:
    return var.get_metadata()["logical_axes"]


def spec_of(w: nnx.Variable | QuantWeight, mesh: Mesh):
    """The ``PartitionSpec`` of a weight (a ``QArray`` of specs for a quantized one), for
    ``shard_map``'s ``in_specs``."""
    if isinstance(w, QuantWeight):
        return QArray(logical_spec(_axes(w.q), w.q.shape, mesh),
                      logical_spec(_axes(w.scale), w.scale.shape, mesh), w.scheme, w.group_size)
    return logical_spec(_axes(w), w.shape, mesh)


def leading_spec(spec):
    """The spec of the weight itself (``q`` of a quantized one)."""
    return spec.q if isinstance(spec, QArray) else spec


def leading_shape(w: jax.Array | QArray) -> tuple[int, ...]:
    return w.q.shape if isinstance(w, QArray) else w.shape


def weight(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype,
           quant: QuantConfig | None, scale: float = 0.02):
    """A random ``[..., D, F]`` weight: an ``nnx.Param`` of ``dtype``, or a ``QuantWeight``."""
    value = scale * jax.random.normal(rngs.params(), shape, jnp.float32)
    if quant is None:
        return nnx.Param(value.astype(dtype), logical_axes=axes)
    return QuantWeight(value, axes, quant, dtype)


# ---- Quantizing (at conversion and at load) ----------------------------------------------


def quantize(w: jax.Array, scheme: str, group_size: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric quantization of ``w [..., D, F]`` along D: ``(q, scale)`` with
    ``w ~ q * scale`` (per out channel; per group of D rows for int4)."""
    w = jnp.asarray(w, jnp.float32)
    if scheme == "int4":
        *lead, d, f = w.shape
        groups = scale_shape(w.shape, scheme, group_size)[-2]
        padded = jnp.pad(w, [(0, 0)] * len(lead) + [(0, groups * group_size - d), (0, 0)])
        amax = jnp.max(jnp.abs(padded.reshape(*lead, groups, group_size, f)), axis=-2)
        scale = _scale(amax, INT_MAX[scheme])
        q = jnp.clip(jnp.round(w / _rows(scale, group_size, d)), -8, 7)
        return q.astype(jnp.int4), scale
    limit = FP8_MAX if scheme == "fp8" else INT_MAX[scheme]
    scale = _scale(jnp.max(jnp.abs(w), axis=-2), limit)
    scaled = jnp.clip(w / scale[..., None, :], -limit, limit)
    q = scaled.astype(FP8) if scheme == "fp8" else jnp.round(scaled).astype(jnp.int8)
    return q, scale


def group_quantizer(quant: QuantConfig, target: Mapping[Any, Any],
                    shardings: Mapping[tuple[str, ...], Any]) -> Callable:
    """A ``checkpoint.restore_params`` transform that quantizes every restored plain weight
    where ``target`` (the quantized model's pure dict) holds a ``{q, scale}`` pair, straight
    into the shardings of ``q`` and ``scale`` (keyed by parameter path)."""
    fn = functools.partial(quantize, scheme=quant.scheme, group_size=quant.group_size)

    def walk(path: tuple[str, ...], stored: Any, want: Any) -> Any:
        if isinstance(want, Mapping) and set(want) == {"q", "scale"} and \
                not isinstance(stored, Mapping):
            out = (shardings[path + ("q",)], shardings[path + ("scale",)])
            q, scale = jax.jit(fn, out_shardings=out)(stored)
            return {"q": q, "scale": scale.astype(want["scale"].dtype)}
        if isinstance(stored, Mapping):
            return {k: walk(path + (str(k),), v, _child(want, k)) for k, v in stored.items()}
        return stored

    def transform(prefix: tuple[str, ...], tree: Mapping[str, Any]) -> dict[str, Any]:
        want: Any = target
        for key in prefix:
            want = _child(want, key)
        return walk(prefix, tree, want)

    return transform


def _child(tree: Mapping[Any, Any], key: str) -> Any:
    return tree[int(key)] if key not in tree and key.isdigit() else tree[key]


def _scale(amax: jax.Array, limit: float) -> jax.Array:
    return jnp.maximum(amax, jnp.finfo(jnp.float32).tiny) / limit


def dequantize(w: QArray, dtype) -> jax.Array:
    """``q * scale`` in ``dtype``: the definition, and int4's in-fusion operand."""
    if w.scheme == "int4":  # in ``dtype``: a convert and a multiply XLA can fuse into a GEMM
        q = w.q.astype(dtype)
        return q * _rows(w.scale, w.group_size, q.shape[-2]).astype(dtype)
    q = w.q.astype(jnp.float32)
    return (q * w.scale[..., None, :]).astype(dtype)


def _rows(scale: jax.Array, group_size: int, rows: int) -> jax.Array:
    """Group scales ``[..., G, F]`` repeated to each of the ``rows`` in features: a broadcast
    (which XLA fuses into the consumer) when the groups tile the rows exactly."""
    *lead, groups, f = scale.shape
    if groups * group_size == rows:
        wide = jnp.broadcast_to(scale[..., None, :], (*lead, groups, group_size, f))
        return wide.reshape(*lead, rows, f)
    return jnp.repeat(scale, group_size, axis=-2)[..., :rows, :]


def quantize_rows_fp8(x: jax.Array, row_axis: str | None = None
                      ) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-row e4m3 activations: ``(x_q [T, D], x_scale [T])`` with x ~ x_q * scale.
    Under ``shard_map`` with D split over mesh axis ``row_axis``, the row's max is taken over
    all its shards, so the scale is the whole row's."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1)
    if row_axis is not None:
        amax = jax.lax.pmax(amax, row_axis)
    scale = _scale(amax, FP8_MAX)
    return jnp.clip(xf / scale[:, None], -FP8_MAX, FP8_MAX).astype(FP8), scale


# ---- Matmuls -----------------------------------------------------------------------------


def matmul(x: jax.Array, w: jax.Array | QArray) -> jax.Array:
    """``x [T, D] @ w [D, F]`` for a plain or quantized weight, in ``x``'s dtype."""
    if not isinstance(w, QArray):
        return x @ w
    if uses_kernel(w):  # one group of all the rows
        rows = jnp.full((1,), x.shape[0], jnp.int32)
        return grouped_matmul(x, w.q[None], w.scale[None], rows, scheme="int4",
                              group_size=w.group_size)

    def dot(a, b):
        return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)

    return _quantized_dot(x, w, dot, lambda: w.scale[None, :]).astype(x.dtype)


def ragged_matmul(x: jax.Array, w: jax.Array | QArray, group_sizes: jax.Array,
                  row_expert: jax.Array, row_axis: str | None = None) -> jax.Array:
    """Grouped ``x [R, D] @ w[e] [D, F]``: rows sorted by expert, ``group_sizes [E]`` rows each
    (``ragged_dot``); ``row_expert [R]`` is each row's expert (any valid one for rows past the
    groups), which picks its column scales; ``row_axis`` is the mesh axis that splits D, if
    any (``quantize_rows_fp8``)."""
    if not isinstance(w, QArray):
        return jax.lax.ragged_dot(x, w, group_sizes)

    if w.scheme == "int4":
        if uses_kernel(w):
            return grouped_matmul(x, w.q, w.scale, group_sizes, scheme="int4",
                                  group_size=w.group_size)
        return _int4_by_expert(x, w, row_expert)

    def dot(a, b):
        return jax.lax.ragged_dot(a, b, group_sizes, preferred_element_type=jnp.float32)

    return _quantized_dot(x, w, dot, lambda: w.scale[row_expert], row_axis).astype(x.dtype)


def uses_kernel(w: jax.Array | QArray) -> bool:
    """Whether ``w``'s matmuls run ``pallas_kernels.grouped_matmul``: an int4 weight, in a
    program for a GPU (XLA does not fuse int4's convert times group scale into a GEMM, so it
    would write a bf16 copy), of a shape the kernel takes (an even number of out columns,
    two a byte; a power-of-two group of at least 16 in features). Off the GPU the XLA
    formulations below compute the same product."""
    if not isinstance(w, QArray) or w.scheme != "int4" or not targets_gpu():
        return False
    group = w.group_size
    return w.q.shape[-1] % 2 == 0 and group >= 16 and group & (group - 1) == 0


def _int4_by_expert(x: jax.Array, w: QArray, row_expert: jax.Array) -> jax.Array:
    """The grouped int4 GEMM off the GPU (and for shapes the kernel does not take): a loop
    over the experts, each a dense dot of the rows (others zeroed) with that expert's weight
    dequantized as the dot's operand: XLA's ragged_dot lowering would first write a bf16 copy
    of every expert. The work is XLA's own lowering's at decode sizes (it too multiplies every
    row by every expert)."""

    def one(e):
        expert = QArray(w.q[e], w.scale[e], w.scheme, w.group_size)
        rows = jnp.where((row_expert == e)[:, None], x, 0)
        return jax.lax.dot_general(rows, dequantize(expert, x.dtype), (((1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)

    # The first expert starts the sum, so that it has the operands' type under shard_map.
    out = jax.lax.fori_loop(1, w.q.shape[0], lambda e, acc: acc + one(e), one(0))
    return out.astype(x.dtype)


def _quantized_dot(x: jax.Array, w: QArray, dot, col_scale, row_axis: str | None = None
                   ) -> jax.Array:
    """One scheme around ``dot(a, b) -> float32`` (plain or ragged); ``col_scale()`` gives the
    out-channel scales broadcast to the rows."""
    if w.scheme == "fp8":
        x_q, x_scale = quantize_rows_fp8(x, row_axis)
        return dot(x_q, w.q) * x_scale[:, None] * col_scale()
    if w.scheme == "int8":
        return dot(x, w.q.astype(x.dtype)) * col_scale().astype(jnp.float32)
    return dot(x, dequantize(w, x.dtype))


# ---- Sizes -------------------------------------------------------------------------------


def dtype_bits(dtype: Any) -> int:
    """Bits one element of ``dtype`` takes in device memory (int4 is packed two per byte)."""
    dtype = np.dtype(dtype)
    if dtype == np.dtype(ml_dtypes.int4) or dtype == np.dtype(ml_dtypes.uint4):
        return 4
    return dtype.itemsize * 8
