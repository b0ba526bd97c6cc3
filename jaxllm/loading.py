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

from jaxllm import checkpoint
from jaxllm.api import Model
from jaxllm.buckets import BucketPolicy
from jaxllm.config import Llama4Config
from jaxllm.kv_cache import CacheConfig
from jaxllm.model import Llama4
from jaxllm.sharding import named_sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def abstract_model(
    config: Llama4Config, dtype: Any, mesh: Mesh | None = None
) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's structure and parameter shapes, without allocating any weights."""
    abstract = nnx.eval_shape(lambda: Llama4(config, dtype=dtype, rngs=nnx.Rngs(0), mesh=mesh))
    return nnx.split(abstract)


def load_model(
    path: str | Path,
    *,
    dtype: str | Any | None = None,
    max_model_len: int | None = None,
    mesh: Mesh | None = None,
    attention_impl: str | None = None,
    page_size: int = 16,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int | None = None,
    hybrid_kv_cache: bool = True,
) -> Model:
    """Loads a checkpoint written by ``scripts/convert_hf_to_orbax.py``.

    ``dtype`` defaults to the checkpoint's own. Each parameter is restored straight into its
    sharding on ``mesh`` (a single device without one): every device reads only its shard.
    The shape limits (``max_model_len``, ``page_size``, ``max_num_seqs``,
    ``max_num_batched_tokens``) and the cache layout become the model's one
    ``BucketPolicy``. With ``hybrid_kv_cache`` the serving engine keeps, in chunked-local
    layers, only the pages of the current attention chunk (``jaxllm.kv_cache``).
    """
    path = Path(path)
    manifest = checkpoint.read_manifest(path)
    config = Llama4Config.from_hf(path)
    if config.vision is not None and "vision" not in manifest["groups"]:
        config = dataclasses.replace(config, vision=None)  # converted with --text-only
    dtype = DTYPES[manifest["dtype"]] if dtype is None else resolve_dtype(dtype)
    max_model_len = max_model_len or config.max_position_embeddings
    if max_model_len <= 0:
        raise ValueError(f"max_model_len={max_model_len} must be positive")
    policy = BucketPolicy(
        max_model_len=max_model_len,
        cache=CacheConfig(page_size=page_size, dtype=dtype, hybrid=hybrid_kv_cache),
        chunk_size=config.attention_chunk_size, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens)
    graphdef, state = abstract_model(config, dtype, mesh)
    shardings: dict[tuple[str, ...], jax.sharding.Sharding] = {}
    stored_shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
    for key_path, var in nnx.to_flat_state(state):
        key = tuple(str(k) for k in key_path)
        axes = var.get_metadata()["logical_axes"]
        shardings[key] = named_sharding(axes, var.shape, mesh)
        # The vocabulary may be padded for the mesh; the checkpoint holds the real size.
        stored_shapes[key] = tuple(config.vocab_size if a == "vocab" else n
                                   for a, n in zip(axes, var.shape, strict=True))
    restored = checkpoint.restore_params(
        path, nnx.to_pure_dict(state), lambda p, leaf: shardings[p], stored_shapes)
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


def resolve_dtype(dtype: Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type
