"""Reading compressed-tensors checkpoints (LLM Compressor's format) into jaxllm's parameters.

A compressed-tensors ``config.json`` carries ``quantization_config``: ``config_groups`` (each
a scheme: ``weights`` / ``input_activations`` args and the ``targets`` it applies to),
``ignore`` (module names or ``re:`` patterns left unquantized) and a ``format``. Quantized
Linear modules store, beside their name:

- ``float-quantized`` (FP8): ``weight`` e4m3 ``[out, in]``, ``weight_scale [out, 1]``;
- ``int-quantized`` / ``naive-quantized`` (int8): ``weight`` int8, ``weight_scale [out, 1]``;
- ``pack-quantized`` (int4, int8): ``weight_packed`` int32 ``[out, ceil(in * bits / 32)]``
  (element i at bits ``[i * bits, (i + 1) * bits)`` of the little-endian words, offset by
  ``2 ** (bits - 1)``), ``weight_scale [out, 1]`` or ``[out, ceil(in / group)]``,
  ``weight_shape = [out, in]``.

Llama 4's routed experts are stored one tensor set per expert
(``feed_forward.experts.{e}.{gate,up,down}_proj``), as HF transformers loads them.

Schemes jaxllm reads: FP8 per-channel weights with dynamic per-token FP8 activations (W8A8,
``fp8``), symmetric int8 per-channel weight-only (``int8``), symmetric int4 group weight-only
(``int4``). Anything else is refused, naming the config group and what it asks for.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

# The weights of nn.Linear modules in a Llama 4 text checkpoint (what "Linear" targets).
LINEAR_SUFFIXES = ("_proj.weight", ".router.weight", "lm_head.weight")
FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")


class QuantCheckpointError(ValueError):
    """A quantized checkpoint jaxllm cannot read (the message names the tensor or scheme)."""


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One config group's scheme, as jaxllm reads it."""

    name: str  # "fp8", "int8", "int4"
    group_size: int | None  # int4 only
    format: str
    targets: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CompressedConfig:
    """The parts of ``quantization_config`` that decide what each tensor holds."""

    schemes: tuple[Scheme, ...]
    ignore: tuple[str, ...]
    kv_cache: bool = False  # per-layer static FP8 k_scale / v_scale (``kv_cache_scheme``)

    def scheme_of(self, module: str) -> Scheme | None:
        """The scheme of Linear ``module`` (its checkpoint name), None if not quantized."""
        if any(_matches(pattern, module) for pattern in self.ignore):
            return None
        for scheme in self.schemes:
            if any(_matches(target, module) for target in scheme.targets):
                return scheme
        return None


def _matches(pattern: str, module: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    # A class name target: every module jaxllm reads this way is an nn.Linear.
    return pattern in ("Linear", module) or module.endswith("." + pattern)


def read_config(hf_config: Mapping[str, Any]) -> CompressedConfig | None:
    """The compressed-tensors config of a checkpoint's ``config.json`` (None if it has no
    ``quantization_config``); raises ``QuantCheckpointError`` for a scheme jaxllm cannot read."""
    qc = hf_config.get("quantization_config")
    if qc is None:
        qc = hf_config.get("text_config", {}).get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise QuantCheckpointError(
            f"quantization_config.quant_method={method!r}: jaxllm reads compressed-tensors "
            f"checkpoints (or quantizes a bf16 one with --quantization)")
    kv_cache = _kv_cache_scheme(qc.get("kv_cache_scheme"))
    schemes = tuple(_scheme(name, group, qc.get("format"))
                    for name, group in qc.get("config_groups", {}).items())
    if not schemes:
        raise QuantCheckpointError("quantization_config has no config_groups")
    return CompressedConfig(schemes, tuple(qc.get("ignore") or ()), kv_cache)


KV_SCALE_NAMES = ("self_attn.k_scale", "self_attn.v_scale")


def _kv_cache_scheme(kv: Mapping[str, Any] | None) -> bool:
    """Whether the checkpoint stores KV cache scales: ``kv_cache_scheme`` must be what vLLM
    serves, static symmetric FP8 (e4m3) with one scale per layer's K and V (``tensor``); each
    attention module then holds ``k_scale`` and ``v_scale`` (compressed-tensors'
    ``initialize_attn_qparams``)."""
    if not kv:
        return False
    kind = (kv.get("type"), kv.get("num_bits"), kv.get("strategy", "tensor"))
    if kind != ("float", 8, "tensor") or kv.get("dynamic") or not kv.get("symmetric", True):
        raise QuantCheckpointError(
            f"quantization_config.kv_cache_scheme={dict(kv)!r}: jaxllm reads static symmetric "
            f"FP8 per-tensor KV cache scales (type float, num_bits 8, strategy tensor)")
    return True


def kv_scale_names(layer: int) -> tuple[str, str]:
    """The text checkpoint names of layer ``layer``'s ``k_scale`` and ``v_scale``."""
    return tuple(f"model.layers.{layer}.{name}" for name in KV_SCALE_NAMES)


def read_kv_scales(source: Any, num_layers: int) -> list[tuple[float, float]]:
    """Every layer's (k_scale, v_scale): one positive finite number each."""
    scales = []
    for layer in range(num_layers):
        pair = []
        for name in kv_scale_names(layer):
            value = np.asarray(source.read(name), np.float32)
            if value.size != 1 or not np.isfinite(value).all() or float(value.item()) <= 0:
                raise QuantCheckpointError(
                    f"tensor {name}: shape {list(value.shape)}, values {value.ravel()[:4]}; "
                    f"expected one positive scale (per-tensor kv_cache_scheme)")
            pair.append(float(value.item()))
        scales.append((pair[0], pair[1]))
    return scales


def _scheme(name: str, group: Mapping[str, Any], default_format: str | None) -> Scheme:
    weights, acts = group.get("weights"), group.get("input_activations")
    fmt = group.get("format") or default_format
    where = f"quantization_config.config_groups.{name}"
    if group.get("output_activations"):
        raise QuantCheckpointError(f"{where}: output activation quantization is not supported")
    if weights is None:
        raise QuantCheckpointError(f"{where}: no weights scheme (activation-only quantization "
                                   f"is not supported)")
    kind = (weights.get("type"), weights.get("num_bits"), weights.get("strategy"))
    if not weights.get("symmetric", True) or weights.get("dynamic"):
        raise QuantCheckpointError(f"{where}: weights {dict(weights)} are asymmetric or dynamic;"
                                   f" jaxllm reads symmetric static weight scales")
    if kind == ("float", 8, "channel"):
        act = None if acts is None else (acts.get("type"), acts.get("num_bits"),
                                         acts.get("strategy"), acts.get("dynamic"))
        if act != ("float", 8, "token", True):
            raise QuantCheckpointError(
                f"{where}: FP8 weights with input_activations {acts}; jaxllm reads FP8 weights "
                f"with dynamic per-token FP8 activations (FP8_DYNAMIC)")
        scheme, group_size, formats = "fp8", None, ("float-quantized", "naive-quantized")
    elif kind in (("int", 8, "channel"), ("int", 4, "group")) and acts is None:
        scheme = "int8" if kind[1] == 8 else "int4"
        group_size = weights.get("group_size") if scheme == "int4" else None
        if scheme == "int4" and not group_size:
            raise QuantCheckpointError(f"{where}: int4 group weights without a group_size")
        formats = ("pack-quantized",) if scheme == "int4" else (
            "pack-quantized", "int-quantized", "naive-quantized")
    else:
        raise QuantCheckpointError(
            f"{where}: unknown scheme (weights {dict(weights)}, input_activations {acts}); "
            f"jaxllm reads FP8 channel weights with dynamic per-token FP8 activations, int8 "
            f"channel and int4 group weight-only schemes")
    if fmt not in formats:
        raise QuantCheckpointError(f"{where}: format {fmt!r} for the {scheme} scheme; expected "
                                   f"one of {formats}")
    return Scheme(scheme, group_size, fmt, tuple(group.get("targets") or ()))


def tensor_names(module: str, scheme: Scheme | None) -> tuple[str, ...]:
    """The checkpoint tensors of Linear ``module`` under ``scheme``."""
    if scheme is None:
        return (module + ".weight",)
    if scheme.format == "pack-quantized":
        return (module + ".weight_packed", module + ".weight_scale", module + ".weight_shape")
    return (module + ".weight", module + ".weight_scale")


STORED_DTYPES = {"fp8": ("F8_E4M3",), "int8": ("I8",), "int4": ()}
SCALE_DTYPES = ("F32", "BF16", "F16")


def expected(module: str, scheme: Scheme | None, out_in: tuple[int, int]
             ) -> dict[str, tuple[tuple[int, ...], tuple[str, ...] | None]]:
    """Per tensor of ``module``: the shape it must have and the dtypes it may have (None: any
    float), for a Linear of ``[out, in]``."""
    out, inp = out_in
    if scheme is None:
        return {module + ".weight": (out_in, None)}
    groups = 1 if scheme.group_size is None else -(-inp // scheme.group_size)
    scale = (module + ".weight_scale", ((out, groups), SCALE_DTYPES))
    if scheme.format == "pack-quantized":
        bits = 4 if scheme.name == "int4" else 8
        return dict([(module + ".weight_packed", ((out, -(-inp * bits // 32)), ("I32",))),
                     scale, (module + ".weight_shape", ((2,), ("I64", "I32")))])
    return dict([(module + ".weight", (out_in, STORED_DTYPES[scheme.name])), scale])


def decode(module: str, scheme: Scheme, arrays: Mapping[str, np.ndarray],
           out_in: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(q [out, in], scale [out, groups])`` of one quantized Linear, as stored (float32
    scales; int4 values as int8)."""
    scale = np.asarray(arrays[module + ".weight_scale"], np.float32)
    if scheme.format != "pack-quantized":
        return arrays[module + ".weight"], scale
    shape = tuple(int(n) for n in arrays[module + ".weight_shape"])
    if shape != tuple(out_in):
        raise QuantCheckpointError(f"tensor {module}.weight_shape is {list(shape)}, expected "
                                   f"{list(out_in)} from config.json")
    bits = 4 if scheme.name == "int4" else 8
    return unpack_int32(arrays[module + ".weight_packed"], bits, out_in[1]), scale


def unpack_int32(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """compressed-tensors' dense int32 packing of ``bits``-bit values (4 or 8) -> int8."""
    rows = packed.shape[0]
    data = np.ascontiguousarray(packed.astype("<i4")).view(np.uint8).reshape(rows, -1)
    if bits == 8:
        values = data[:, :cols].astype(np.int16)
    elif bits == 4:
        values = np.empty((rows, data.shape[1] * 2), np.int16)
        values[:, 0::2], values[:, 1::2] = data & 0xF, data >> 4
        values = values[:, :cols]
    else:
        raise QuantCheckpointError(f"{bits}-bit packed weights are not supported")
    return (values - (1 << (bits - 1))).astype(np.int8)


def dequantize(q: np.ndarray, scale: np.ndarray, scheme: Scheme) -> np.ndarray:
    """``q [out, in] * scale`` in float32 (a quantized tensor jaxllm keeps unquantized)."""
    rows = q.astype(np.float32)
    if scheme.group_size is None:
        return rows * scale
    per_col = np.repeat(scale, scheme.group_size, axis=1)[:, : q.shape[1]]
    return rows * per_col


# ---- The conversion plan of a compressed-tensors checkpoint ------------------------------

KINDS = ("routed", "shared", "dense")


@dataclasses.dataclass(frozen=True)
class LinearEntry:
    """Linear module(s) of the checkpoint that become one jaxllm weight.

    ``modules`` are text-model names; several are experts stacked on a leading axis
    (``[E, in, out]``). ``kind`` is the quantization target they belong to (``routed``,
    ``shared``, ``dense``) or None (attention, router, lm_head: kept unquantized, so a
    quantized one is dequantized). ``finish`` turns the float ``[..., in, out]`` weight into
    jaxllm's layout."""

    modules: tuple[str, ...]
    schemes: tuple[Scheme | None, ...]
    out_in: tuple[int, int]
    path: tuple[str, ...]
    kind: str | None
    finish: Any = None

    def tensors(self) -> dict[str, tuple[tuple[int, ...], tuple[str, ...] | None]]:
        out: dict = {}
        for module, scheme in zip(self.modules, self.schemes, strict=True):
            out.update(expected(module, scheme, self.out_in))
        return out


def kind_of(text_name: str, num_layers_moe: set[int]) -> str | None:
    """The quantization target of an HF text-model Linear weight name (None for the rest)."""
    m = re.match(r"model\.layers\.(\d+)\.feed_forward\.(.*)", text_name)
    if m is None:
        return None
    rest = m.group(2)
    if rest.startswith("experts."):
        return "routed"
    if rest.startswith("shared_expert."):
        return "shared"
    if rest.startswith(("gate_proj", "up_proj", "down_proj")):
        return "dense" if int(m.group(1)) not in num_layers_moe else None
    return None


def original_module(source: Any, module: str) -> str:
    """The checkpoint's own name of text-model module ``module`` (for ``ignore`` patterns)."""
    for suffix in (".weight", ".weight_packed"):
        if module + suffix in source.location:
            return source.location[module + suffix][1][: -len(suffix)]
    return module


def check_tensors(entries: list[LinearEntry], source: Any) -> None:
    """Every tensor of every entry is present with its shape and dtype (from the headers), and
    packed shapes agree; raises naming the first tensor that is not."""
    for entry in entries:
        for name, (shape, dtypes) in entry.tensors().items():
            if name not in source.location:
                raise QuantCheckpointError(f"tensor {name} is missing (needed by "
                                           f"{_describe(entry, name)})")
            file, original = source.location[name]
            info = source.headers[file]["tensors"][original]
            if tuple(info["shape"]) != shape:
                raise QuantCheckpointError(
                    f"tensor {original} has shape {tuple(info['shape'])}, expected {shape} for "
                    f"{_describe(entry, name)}")
            if dtypes is not None and info["dtype"] not in dtypes:
                raise QuantCheckpointError(f"tensor {original} has dtype {info['dtype']}, "
                                           f"expected one of {dtypes}")


def _describe(entry: LinearEntry, name: str) -> str:
    for module, scheme in zip(entry.modules, entry.schemes, strict=True):
        if name.startswith(module + "."):
            how = "unquantized" if scheme is None else f"{scheme.name} ({scheme.format})"
            return f"{how} module {module}"
    return "the model"


def target_of(entries: list[LinearEntry]) -> tuple[str, int | None, tuple[str, ...]] | None:
    """The one scheme the checkpoint's quantized FFN weights use: (scheme, group_size, kinds),
    or None when none is quantized; two schemes among them are refused."""
    found: dict[tuple[str, int | None], set[str]] = {}
    for entry in entries:
        if entry.kind is None:
            continue
        for module, scheme in zip(entry.modules, entry.schemes, strict=True):
            if scheme is not None:
                found.setdefault((scheme.name, scheme.group_size), set()).add(entry.kind)
                if len(found) > 1:
                    raise QuantCheckpointError(
                        f"module {module} is quantized as {scheme.name}, other feed-forward "
                        f"weights as {sorted(found)[0][0]}: one scheme per checkpoint is read")
    if not found:
        return None
    [(scheme_name, group_size)] = found
    kinds = tuple(k for k in KINDS if k in found[(scheme_name, group_size)])
    return scheme_name, group_size, kinds


def read_linear(entry: LinearEntry, source: Any, keep_quantized: bool):
    """The entry's weight: ``{"q", "scale"}`` in jaxllm's layout (``[..., in, out]``, scales
    per out column) when ``keep_quantized`` and every module is quantized, else a float32
    ``[..., in, out]`` array (each quantized module dequantized)."""
    import ml_dtypes

    parts = []
    quantized = keep_quantized and all(s is not None for s in entry.schemes)
    for module, scheme in zip(entry.modules, entry.schemes, strict=True):
        arrays = {name: source.read(name) for name in expected(module, scheme, entry.out_in)}
        if scheme is None:
            parts.append(np.asarray(arrays[module + ".weight"], np.float32).T)
            continue
        q, scale = decode(module, scheme, arrays, entry.out_in)
        if not quantized:
            parts.append(dequantize(q, scale, scheme).T)
            continue
        scale = scale[:, 0] if scheme.group_size is None else scale.T
        if scheme.name == "int4":
            q = q.astype(ml_dtypes.int4)
        parts.append((np.ascontiguousarray(q.T), np.ascontiguousarray(scale)))
    stack = len(entry.modules) > 1
    if quantized:
        qs, scales = zip(*parts, strict=True)
        return {"q": np.stack(qs) if stack else qs[0],
                "scale": np.stack(scales) if stack else scales[0]}
    weight = np.stack(parts) if stack else parts[0]
    return entry.finish(weight) if entry.finish is not None else weight
