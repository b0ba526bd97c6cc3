"""The paged KV cache: its configuration, its arrays, their sharding, and the page writer.

Glossary: P pages, p page size (tokens per page), K kv heads, d head dim.

``CacheConfig`` is the one owner of the page size, the number of pages and the cache dtype:
the bucket policy, the page allocator, the step builder, the runner and the kernels all read
them from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm.config import Llama4Config
from jaxllm.sharding import constrain, named_sharding

KV_CACHE_AXES = ("pages", "page_slots", "kv_heads", "head_dim")

KVCache = list[tuple[jax.Array, jax.Array]]  # per layer: (k_pages, v_pages), each [P, p, K, d]


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Shape of the paged KV cache. ``num_pages`` is None until a cache is sized (the model
    knows its page size and dtype at load time; the engine decides how many pages)."""

    page_size: int = 16
    dtype: Any = jnp.bfloat16
    num_pages: int | None = None

    def __post_init__(self):
        if self.page_size < 1:
            raise ValueError(f"page_size={self.page_size} must be >= 1")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"num_pages={self.num_pages} must be >= 1")

    def with_pages(self, num_pages: int) -> CacheConfig:
        return dataclasses.replace(self, num_pages=num_pages)

    def page_shape(self, config: Llama4Config) -> tuple[int, int, int, int]:
        """``[P, p, K, d]`` of one layer's key (or value) pages."""
        if self.num_pages is None:
            raise ValueError("the KV cache has no size yet: give it num_pages first")
        return (self.num_pages, self.page_size, config.num_kv_heads, config.head_dim)

    def bytes_per_token(self, config: Llama4Config) -> int:
        """Bytes of K and V one token takes over every layer."""
        per_layer = 2 * config.num_kv_heads * config.head_dim * jnp.dtype(self.dtype).itemsize
        return per_layer * config.num_layers


def kv_cache_sharding(config: Llama4Config, cache: CacheConfig,
                      mesh: Mesh | None) -> jax.sharding.Sharding:
    """Sharding of one layer's page array (kv heads split over the ``model`` axis)."""
    return named_sharding(KV_CACHE_AXES, cache.page_shape(config), mesh)


def init_kv_cache(config: Llama4Config, cache: CacheConfig, mesh: Mesh | None = None) -> KVCache:
    """Zeroed paged KV cache: one (k_pages, v_pages) pair of ``[P, p, K, d]`` per layer."""
    shape = cache.page_shape(config)

    def pages():
        return constrain(jnp.zeros(shape, cache.dtype), KV_CACHE_AXES, mesh)

    return [(pages(), pages()) for _ in range(config.num_layers)]


def write_kv_pages(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slot_mapping: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Scatters new keys/values ``[T, K, d]`` into pages ``[P, p, K, d]``.

    ``slot_mapping[t]`` is row t's flat slot (``jaxllm.layout.slot_of``); a negative slot
    marks a padding row whose write is dropped (never wrapped around to the last slot).
    """
    num_pages, page_size = k_pages.shape[:2]
    num_slots = num_pages * page_size
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)

    def scatter(pages: jax.Array, new: jax.Array) -> jax.Array:
        flat = pages.reshape(num_slots, *pages.shape[2:])
        flat = flat.at[slots].set(new.astype(pages.dtype), mode="drop")
        return flat.reshape(pages.shape)

    return scatter(k_pages, k), scatter(v_pages, v)
