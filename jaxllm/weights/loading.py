"""``load_model``: a converted checkpoint restored straight into its shardings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxllm.buckets import BucketPolicy
from jaxllm.config import Llama4Config
from jaxllm.model import quant as quant_lib
from jaxllm.model.llama4 import Llama4
from jaxllm.model.quant import QuantConfig
from jaxllm.runtime.handle import Model
from jaxllm.sharding import named_sharding
from jaxllm.weights import checkpoint

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def abstract_model(
    config: Llama4Config, dtype: Any, mesh: Mesh | None = None,
    quant: QuantConfig | None = None, kv_scales: Any = None,
) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's structure and parameter shapes, without allocating any weights
    (``kv_scales``: per-layer fp8 KV cache scales, ``Llama4``'s)."""
    abstract = nnx.eval_shape(
        lambda: Llama4(config, dtype=dtype, rngs=nnx.Rngs(0), mesh=mesh, quant=quant,
                       kv_scales=kv_scales))
    return nnx.split(abstract)


def _targets(config: Llama4Config, state: nnx.State, mesh: Mesh | None) -> tuple[dict, dict]:
    """Per parameter path: its sharding, and the shape the checkpoint holds (the vocabulary
    may be padded for the mesh; the checkpoint holds the real size)."""
    shardings: dict[tuple[str, ...], jax.sharding.Sharding] = {}
    stored_shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
    for key_path, var in nnx.to_flat_state(state):
        key = tuple(str(k) for k in key_path)
        axes = var.get_metadata()["logical_axes"]
        shardings[key] = named_sharding(axes, var.shape, mesh)
        stored_shapes[key] = tuple(config.vocab_size if a == "vocab" else n
                                   for a, n in zip(axes, var.shape, strict=True))
    return shardings, stored_shapes


def load_model(
    path: str | Path,
    *,
    dtype: str | Any | None = None,
    max_model_len: int | None = None,
    mesh: Mesh | None = None,
    attention_impl: str | None = None,
    page_size: int = 16,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    hybrid_kv_cache: bool = True,
    quantization: str | None = None,
    quantization_scope: str = "experts",
    kv_cache_dtype: str = "auto",
) -> Model:
    """Loads a checkpoint written by ``scripts/convert_hf_to_orbax.py``.

    ``dtype`` defaults to the checkpoint's own. Each parameter is restored straight into its
    sharding on ``mesh`` (a single device without one): every device reads only its shard.
    The shape limits (``max_model_len``, ``page_size``, ``max_num_seqs``,
    ``max_num_batched_tokens``) and the cache layout become the model's one
    ``BucketPolicy``. With ``hybrid_kv_cache`` the serving engine keeps, in chunked-local
    layers, only the pages of the current attention chunk (``jaxllm.kv_cache``).

    A checkpoint converted with ``--quantization`` loads quantized. ``quantization`` (``fp8``,
    ``int8``, ``int4``) quantizes an unquantized one while it loads, one parameter group at a
    time, over ``quantization_scope`` (``experts``: routed and shared; ``ffn``: also the dense
    FFN layers; ``jaxllm.model.quant``). ``kv_cache_dtype="fp8"`` keeps the KV cache in e4m3,
    with the checkpoint's calibrated ``k_scale`` / ``v_scale`` when it has them (compressed-
    tensors' ``kv_cache_scheme``), else unit scales.
    """
    path = Path(path)
    manifest = checkpoint.read_manifest(path)
    config = Llama4Config.from_hf(path)
    if config.vision is not None and "vision" not in manifest["groups"]:
        config = dataclasses.replace(config, vision=None)  # converted with --text-only
    dtype = DTYPES[manifest["dtype"]] if dtype is None else resolve_dtype(dtype)
    stored_quant = QuantConfig.from_json(manifest.get("quantization"))
    load_quant = QuantConfig.from_flags(quantization, quantization_scope)
    if stored_quant is not None and load_quant is not None and load_quant != stored_quant:
        raise ValueError(f"{path} is quantized as {stored_quant.to_json()}; it cannot be "
                         f"loaded as quantization={quantization!r}, scope={quantization_scope!r}")
    if stored_quant is not None:
        load_quant = None
    quant = stored_quant or load_quant
    policy = BucketPolicy.for_model(
        config, dtype=kv_cache_dtype_of(kv_cache_dtype, dtype), max_model_len=max_model_len,
        page_size=page_size, hybrid=hybrid_kv_cache, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens)
    graphdef, state = abstract_model(config, dtype, mesh, quant,
                                     checkpoint.kv_cache_scales(manifest))
    shardings, stored_shapes = _targets(config, state, mesh)
    transform = None
    stored = state
    if load_quant is not None:  # restore the plain weights, quantize each group as it comes
        stored = abstract_model(config, dtype, mesh)[1]
        target = nnx.to_pure_dict(state)
        transform = quant_lib.group_quantizer(load_quant, target, dict(shardings))
        shardings, stored_shapes = _targets(config, stored, mesh)
    restored = checkpoint.restore_params(
        path, nnx.to_pure_dict(stored), lambda p, leaf: shardings[p], stored_shapes,
        transform=transform)
    nnx.replace_by_pure_dict(state, restored)
    return Model(config, graphdef, state, dtype=dtype, bucket_policy=policy, mesh=mesh,
                 attention_impl=attention_impl, eos_token_ids=_eos_token_ids(path), path=path)


def _eos_token_ids(path: Path) -> tuple[int, ...] | None:
    """EOS ids from ``generation_config.json`` (int or list), if the checkpoint has one."""
    gen = path / "generation_config.json"
    if not gen.is_file():
        return None
    eos = json.loads(gen.read_text()).get("eos_token_id")
    if eos is None:
        return None
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def kv_cache_dtype_of(kv_cache_dtype: str, dtype: Any) -> Any:
    """The KV cache's dtype for ``--kv-cache-dtype``: the model's (``auto``) or e4m3."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: expected one of {KV_CACHE_DTYPES}")
    return dtype if kv_cache_dtype == "auto" else jnp.float8_e4m3fn


def resolve_dtype(dtype: Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type
