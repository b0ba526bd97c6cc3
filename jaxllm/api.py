"""``load_model`` and the ``Model`` handle that research code and the engine hold."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm import checkpoint
from jaxllm.attention import check_attention_impl
from jaxllm.batch import check_token_ids, full_sequence_batch
from jaxllm.config import Llama4Config
from jaxllm.model import Llama4, init_kv_cache

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Model:
    """A loaded Llama 4: config, parameters (an ``nnx.State``) and the compiled forward."""

    def __init__(
        self,
        config: Llama4Config,
        graphdef: nnx.GraphDef,
        params: nnx.State,
        *,
        dtype: Any,
        max_model_len: int | None = None,
        mesh: jax.sharding.Mesh | None = None,
        attention_impl: str | None = None,
        page_size: int = 16,
        path: Path | None = None,
    ):
        self.config = config
        self.graphdef = graphdef
        self.params = params
        self.dtype = dtype
        self.max_model_len = max_model_len or config.max_position_embeddings
        if self.max_model_len <= 0:
            raise ValueError(f"max_model_len={self.max_model_len} must be positive")
        self.mesh = mesh
        self.attention_impl = check_attention_impl(attention_impl)
        self.page_size = page_size
        self.path = path

    def module(self) -> Llama4:
        return nnx.merge(self.graphdef, self.params)

    def logits(self, token_ids: Any) -> np.ndarray:
        """Float32 logits ``[B, T, V]`` for token ids ``[B, T]`` at positions ``0..T-1``."""
        ids = check_token_ids(token_ids, self.config.vocab_size)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"token_ids must be [batch, length] with length >= 1, got {ids.shape}")
        batch, length = ids.shape
        if length > self.max_model_len:
            raise ValueError(f"sequence of {length} tokens exceeds max_model_len="
                             f"{self.max_model_len}")
        positions, meta, num_pages = full_sequence_batch([length] * batch, self.page_size)
        out = _full_logits(self.graphdef, self.attention_impl, num_pages, self.page_size,
                           self.params, ids.reshape(-1), positions, meta)
        return np.asarray(out).reshape(batch, length, -1)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _full_logits(graphdef, attention_impl, num_pages, page_size, params, tokens, positions, meta):
    model = nnx.merge(graphdef, params)
    cache = init_kv_cache(model.config, num_pages, page_size, model.embed.dtype)
    hidden, _ = model(tokens, positions, cache, meta, attention_impl=attention_impl)
    return model.logits(hidden)


def abstract_model(config: Llama4Config, dtype: Any) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's structure and parameter shapes, without allocating any weights."""
    abstract = nnx.eval_shape(lambda: Llama4(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def load_model(
    path: str | Path,
    *,
    dtype: str | Any | None = None,
    max_model_len: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    attention_impl: str | None = None,
) -> Model:
    """Loads a checkpoint written by ``scripts/convert_hf_to_orbax.py``.

    ``dtype`` defaults to the checkpoint's own; parameters are restored group by group
    straight into their target devices.
    """
    path = Path(path)
    manifest = checkpoint.read_manifest(path)
    config = Llama4Config.from_hf(path)
    dtype = _DTYPES[manifest["dtype"]] if dtype is None else _resolve_dtype(dtype)
    graphdef, state = abstract_model(config, dtype)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = checkpoint.restore_params(path, nnx.to_pure_dict(state), lambda p, leaf: device)
    nnx.replace_by_pure_dict(state, restored)
    return Model(config, graphdef, state, dtype=dtype, max_model_len=max_model_len, mesh=mesh,
                 attention_impl=attention_impl, path=path)


def _resolve_dtype(dtype: Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    return jnp.dtype(dtype).type
