"""The ``Model`` handle that research code and the engine hold: config, parameters, the
configuration of its shapes and cache, and full-sequence logits.

Loading is ``jaxllm.weights.loading``; generation and its warm-up are
``jaxllm.runtime.generate``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.buckets import BucketPolicy
from jaxllm.config import Llama4Config, VisionConfig
from jaxllm.kv_cache import init_kv_cache
from jaxllm.layout import (
    SeqPiece,
    build_step,
    check_token_ids,
    contiguous_num_pages,
    contiguous_pages,
    pages_for,
)
from jaxllm.model.attention import check_attention_impl
from jaxllm.model.llama4 import Llama4
from jaxllm.model.vision import ImageEmbeds
from jaxllm.multimodal.prompt import feature_rows
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

    def encode_images(self, pixel_values: Any) -> np.ndarray:
        """Projected image features ``[N, tokens_per_tile, D]`` of tiles ``[N, C, S, S]`` (the
        processor's ``pixel_values``), through programs compiled per power-of-two tile count."""
        vision = self.require_vision()
        pixels = np.asarray(pixel_values, np.float32)
        want = (vision.num_channels, vision.image_size, vision.image_size)
        if pixels.ndim != 4 or pixels.shape[1:] != want or pixels.shape[0] == 0:
            raise ValueError(f"pixel_values must be [tiles >= 1, {', '.join(map(str, want))}], "
                             f"got {pixels.shape}")
        tiles = pixels.shape[0]
        bucket = 1 << (tiles - 1).bit_length()
        padded = np.zeros((bucket, *want), np.float32)
        padded[:tiles] = pixels
        return to_host(self.encoder(bucket)(self.params, padded))[:tiles]

    def encoder(self, tiles: int) -> Any:
        """The jitted vision tower for a bucket of ``tiles`` tiles: ``(params, pixels) ->
        features``."""
        return self.compiled(("encode_images", tiles), self._compile_encode)

    def require_vision(self) -> VisionConfig:
        """The vision config; raises ValueError (a 400 at the server) for a text-only model."""
        if self.config.vision is None:
            raise ValueError("this model has no vision tower (a text-only checkpoint, or one "
                             "converted with --text-only): it cannot take images")
        return self.config.vision

    def _compile_encode(self):
        graphdef = self.graphdef

        def encode(params, pixels):
            return nnx.merge(graphdef, params).vision(pixels)

        rep = self.replicated()
        return jax.jit(encode, in_shardings=(self.param_shardings, rep), out_shardings=rep)

    def image_embeds(self, token_ids: Sequence[Sequence[int]],
                     pixel_values: Sequence[Any | None], shape: tuple[int, int]
                     ) -> ImageEmbeds | None:
        """``ImageEmbeds`` for prompts ``token_ids`` laid out in a ``shape`` = (B, L) grid
        (rows [B, L], -1 for text and padding): prompt b's ``<|patch|>`` tokens take, in
        order, the features of its tiles ``pixel_values[b]`` ([N_b, C, S, S]; None or empty:
        no image). None when no prompt has an image. Features are padded to B·L rows (no
        grid holds more patch tokens), so their shape is fixed by the grid: no compile per
        image count."""
        if len(pixel_values) != len(token_ids):
            raise ValueError(f"{len(pixel_values)} image entries for {len(token_ids)} prompts")
        present = [p for p in pixel_values if p is not None and len(p)]
        if not present:
            return None
        vision = self.require_vision()
        features = self.encode_images(np.concatenate(present))
        features = features.reshape(-1, features.shape[-1])
        rows = np.full(shape, -1, np.int32)
        first = 0
        for b, (ids, pixels) in enumerate(zip(token_ids, pixel_values, strict=True)):
            count = 0 if pixels is None else len(pixels) * vision.tokens_per_tile
            rows[b, : len(ids)] = feature_rows(ids, vision.image_token_id, count, first)
            first += count
        padded = np.zeros((shape[0] * shape[1], features.shape[-1]), features.dtype)
        padded[: len(features)] = features
        return ImageEmbeds(padded, rows)

    def logits(self, token_ids: Any, images: Sequence[Any | None] | None = None) -> np.ndarray:
        """Float32 logits ``[B, T, V]`` for token ids ``[B, T]`` at positions ``0..T-1``.

        ``images[b]`` (optional): the tiles ``[N_b, C, S, S]`` of prompt b's images in prompt
        order (``jaxllm.multimodal.processor``), whose features replace its ``<|patch|>``
        embeddings, as in HF's ``Llama4ForConditionalGeneration``.
        """
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
        embeds = None if images is None else self.image_embeds(ids, images, (batch, length))
        if embeds is not None:
            flat = np.full(num_rows, -1, np.int32)
            flat[: batch * length] = embeds.rows.reshape(-1)
            embeds = embeds._replace(rows=flat)
        fn = self.compiled(("logits", num_rows, cache.num_pages),
                           lambda: self._compile_logits(num_rows, cache))
        out = to_host(fn(self.params, step.tokens, step.meta, embeds))
        return out[: batch * length, : self.config.vocab_size].reshape(batch, length, -1)

    def _compile_logits(self, num_rows: int, cache):
        graphdef, impl, mesh = self.graphdef, self.attention_impl, self.mesh

        def full_logits(params, tokens, meta, images):
            model = nnx.merge(graphdef, params)
            hidden, _ = model(tokens, init_kv_cache(model.config, cache, mesh), meta,
                              attention_impl=impl, images=images)
            return model.logits(hidden)

        rep = self.replicated()
        logits_sharding = named_sharding(("tokens", "vocab"), (num_rows, self.padded_vocab),
                                         mesh)
        return jax.jit(full_logits, in_shardings=(self.param_shardings, rep, rep, rep),
                       out_shardings=logits_sharding)
