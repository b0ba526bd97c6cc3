"""The ``Model`` handle that research code and the engine hold: config, parameters, the
configuration of its shapes and cache, and full-sequence logits.

Loading is ``jaxllm.loading``; generation and its warm-up are ``jaxllm.generate``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.attention import check_attention_impl
from jaxllm.buckets import BucketPolicy
from jaxllm.config import Llama4Config
from jaxllm.kv_cache import init_kv_cache
from jaxllm.layout import (
    SeqPiece,
    build_step,
    check_token_ids,
    contiguous_num_pages,
    contiguous_pages,
    pages_for,
)
from jaxllm.model import Llama4
from jaxllm.sharding import named_sharding, padded_vocab_size, param_shardings, to_host


class Model:
    """A loaded Llama 4: config, parameters (an ``nnx.State``) and its bucket policy.

    ``bucket_policy`` is the one owner of ``max_model_len`` and (through its ``cache``) of the
    page size and cache dtype; everything that runs the model reads them from there.
    """

    def __init__(
        self,
        config: Llama4Config,
        graphdef: nnx.GraphDef,
        params: nnx.State,
        *,
        dtype: Any,
        bucket_policy: BucketPolicy,
        mesh: Mesh | None = None,
        attention_impl: str | None = None,
        eos_token_ids: tuple[int, ...] | None = None,
        path: Path | None = None,
    ):
        self.config = config
        self.graphdef = graphdef
        self.params = params
        self.dtype = dtype
        self.bucket_policy = bucket_policy
        self.mesh = mesh
        self.attention_impl = check_attention_impl(attention_impl)
        self.path = path
        self.eos_token_ids = config.eos_token_ids if eos_token_ids is None else eos_token_ids
        # The vocabulary as the logits have it: padded to a multiple of its mesh axis.
        self.padded_vocab = padded_vocab_size(config.vocab_size, mesh)
        self.param_shardings = param_shardings(params, mesh)
        self._compiled: dict[Any, Any] = {}

    def compiled(self, key: Any, build: Callable[[], Any]) -> Any:
        """The program cached under ``key``, built (once) by ``build``."""
        if key not in self._compiled:
            self._compiled[key] = build()
        return self._compiled[key]

    def module(self) -> Llama4:
        return nnx.merge(self.graphdef, self.params)

    def replicated(self) -> jax.sharding.Sharding:
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return NamedSharding(self.mesh, PartitionSpec())

    def logits(self, token_ids: Any) -> np.ndarray:
        """Float32 logits ``[B, T, V]`` for token ids ``[B, T]`` at positions ``0..T-1``."""
        ids = check_token_ids(token_ids, self.config.vocab_size)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"token_ids must be [batch, length] with length >= 1, got {ids.shape}")
        batch, length = ids.shape
        self.bucket_policy.check_length(length)
        width = pages_for(length, self.bucket_policy.page_size)
        cache = self.bucket_policy.cache.contiguous(contiguous_num_pages(1, batch, width))
        data = 1 if self.mesh is None else int(self.mesh.shape["data"])
        num_rows = -(-batch * length // data) * data  # the token axis splits over "data"
        chunks = [SeqPiece([contiguous_pages(0, s, batch, width)], 0, ids[s])
                  for s in range(batch)]
        step = build_step(chunks, cache, width=width, num_rows=num_rows, num_slots=batch)
        fn = self.compiled(("logits", num_rows, cache.num_pages),
                           lambda: self._compile_logits(num_rows, cache))
        out = to_host(fn(self.params, step.tokens, step.meta))
        return out[: batch * length, : self.config.vocab_size].reshape(batch, length, -1)

    def _compile_logits(self, num_rows: int, cache):
        graphdef, impl, mesh = self.graphdef, self.attention_impl, self.mesh

        def full_logits(params, tokens, meta):
            model = nnx.merge(graphdef, params)
            hidden, _ = model(tokens, init_kv_cache(model.config, cache, mesh), meta,
                              attention_impl=impl)
            return model.logits(hidden)

        rep = self.replicated()
        logits_sharding = named_sharding(("tokens", "vocab"), (num_rows, self.padded_vocab),
                                         mesh)
        return jax.jit(full_logits, in_shardings=(self.param_shardings, rep, rep),
                       out_shardings=logits_sharding)
