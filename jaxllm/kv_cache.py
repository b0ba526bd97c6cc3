"""The paged KV cache: its configuration, its layer groups, its arrays, and the page writer.

Glossary: P pages, p page size (tokens per page), K kv heads, d head dim, G layer groups.

``CacheConfig`` is the one owner of the page size, the number of pages, the cache dtype and
whether the cache is hybrid: the bucket policy, the page allocator, the step builder, the
runner and the kernels all read them from it.

**Layer groups (the hybrid cache).** Llama 4's chunked-local layers (36 of Scout's 48) can only
ever see the current attention chunk, so they need not keep a sequence's whole history. The
layers are split into groups of equal size g; each group has its own block table per
sequence, and a group of chunked layers drops the pages its chunk has left behind. All groups
draw from one pool of pages: page id i has room in every one of g *slabs* (arrays of
``[P, p, K, d]``), and layer l keeps its keys in slab ``slab[l]`` at the pages of its group.
So a page is g layers' worth of memory, given to whichever group needs it. Without the
hybrid cache all layers form one group and every layer has its own slab (g = layers).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm.config import Llama4Config
from jaxllm.sharding import constrain, named_sharding

KV_CACHE_AXES = ("pages", "page_slots", "kv_heads", "head_dim")

KVCache = list[tuple[jax.Array, jax.Array]]  # per slab: (k_pages, v_pages), each [P, p, K, d]


FP8_KV = jnp.dtype(jnp.float8_e4m3fn)
FP8_KV_MAX = float(jnp.finfo(FP8_KV).max)

NULL_PAGE = 0  # never handed out: block-table entries a chunked group has dropped point here


@dataclasses.dataclass(frozen=True)
class LayerGroups:
    """Which block table (group) and which slab each layer uses; see the module docstring."""

    layer_group: tuple[int, ...]
    layer_slab: tuple[int, ...]
    group_chunk: tuple[int | None, ...]  # per group: its attention chunk, or None (global)

    @property
    def num_groups(self) -> int:
        return len(self.group_chunk)

    @property
    def num_slabs(self) -> int:
        return max(self.layer_slab) + 1


@functools.lru_cache(maxsize=64)
def layer_groups(config: Llama4Config, hybrid: bool) -> LayerGroups:
    """One group of every layer, or (``hybrid``) global and chunked layers in separate groups
    of ``gcd(#global, #chunked)`` layers each. Worked out once per (config, hybrid): every
    part that asks (engine, runner, memory plan, AOT cases) gets the same object."""
    n = config.num_layers
    chunks = [config.chunk_size(i) for i in range(n)]
    if not hybrid or len(set(chunks)) == 1:
        chunk = chunks[0] if len(set(chunks)) == 1 else None
        return LayerGroups((0,) * n, tuple(range(n)), (chunk,))
    kinds = sorted(set(chunks), key=lambda c: (c is not None, c or 0))
    members = [[i for i in range(n) if chunks[i] == c] for c in kinds]
    size = math.gcd(*(len(m) for m in members))
    group, slab, group_chunk = [0] * n, [0] * n, []
    for c, layers in zip(kinds, members, strict=True):
        for start in range(0, len(layers), size):
            for j, layer in enumerate(layers[start : start + size]):
                group[layer], slab[layer] = len(group_chunk), j
            group_chunk.append(c)
    return LayerGroups(tuple(group), tuple(slab), tuple(group_chunk))


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Shape of the paged KV cache. ``num_pages`` is None until a cache is sized (the model
    knows its page size and dtype at load time; the engine decides how many pages)."""

    page_size: int = 16
    dtype: Any = jnp.bfloat16
    num_pages: int | None = None  # pages to hand out (ids 1..num_pages; 0 is the null page)
    hybrid: bool = False  # chunked-local layers keep only the pages their chunk can see

    def __post_init__(self):
        if self.page_size < 1:
            raise ValueError(f"page_size={self.page_size} must be >= 1")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"num_pages={self.num_pages} must be >= 1")

    def with_pages(self, num_pages: int) -> CacheConfig:
        return dataclasses.replace(self, num_pages=num_pages)

    def page_shape(self, config: Llama4Config) -> tuple[int, int, int, int]:
        """``[P, p, K, d]`` of one slab's key (or value) pages: ``num_pages`` pages to hand
        out, plus the null page 0."""
        if self.num_pages is None:
            raise ValueError("the KV cache has no size yet: give it num_pages first")
        return (self.num_pages + 1, self.page_size, config.num_kv_heads, config.head_dim)

    def contiguous(self, num_pages: int) -> CacheConfig:
        """A cache of ``num_pages`` whose sequences keep every page (``generate()`` and
        ``Model.logits`` give each sequence a fixed, contiguous range: nothing to free)."""
        return dataclasses.replace(self, num_pages=num_pages, hybrid=False)

    def groups(self, config: Llama4Config) -> LayerGroups:
        return layer_groups(config, self.hybrid)

    def bytes_per_token(self, config: Llama4Config, mesh: Mesh | None = None) -> int:
        """Bytes of K and V one token takes in one layer, on one device of ``mesh`` (whose
        ``model`` axis may split the kv heads)."""
        heads = config.num_kv_heads
        if mesh is not None:
            shape = (1, 1, heads, config.head_dim)
            heads = named_sharding(KV_CACHE_AXES, shape, mesh).shard_shape(shape)[2]
        return 2 * heads * config.head_dim * jnp.dtype(self.dtype).itemsize

    def bytes_per_page(self, config: Llama4Config, mesh: Mesh | None = None) -> int:
        """Bytes of one page id on one device: ``page_size`` tokens in every slab."""
        slabs = self.groups(config).num_slabs
        return slabs * self.page_size * self.bytes_per_token(config, mesh)


def kv_cache_sharding(config: Llama4Config, cache: CacheConfig,
                      mesh: Mesh | None) -> jax.sharding.Sharding:
    """Sharding of one layer's page array (kv heads split over the ``model`` axis)."""
    return named_sharding(KV_CACHE_AXES, cache.page_shape(config), mesh)


def init_kv_cache(config: Llama4Config, cache: CacheConfig, mesh: Mesh | None = None) -> KVCache:
    """Zeroed paged KV cache: one (k_pages, v_pages) pair of ``[P, p, K, d]`` per slab."""
    shape = cache.page_shape(config)

    def pages():
        return constrain(jnp.zeros(shape, cache.dtype), KV_CACHE_AXES, mesh)

    return [(pages(), pages()) for _ in range(cache.groups(config).num_slabs)]


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
    An fp8 cache (``--kv-cache-dtype fp8``) holds e4m3 values at unit scale, vLLM's default
    without calibrated scales: values past +-448 saturate (a plain cast would make them NaN).
    """
    num_pages, page_size = k_pages.shape[:2]
    num_slots = num_pages * page_size
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)

    def scatter(pages: jax.Array, new: jax.Array) -> jax.Array:
        flat = pages.reshape(num_slots, *pages.shape[2:])
        if pages.dtype == FP8_KV:
            new = jnp.clip(new.astype(jnp.float32), -FP8_KV_MAX, FP8_KV_MAX)
        flat = flat.at[slots].set(new.astype(pages.dtype), mode="drop")
        return flat.reshape(pages.shape)

    return scatter(k_pages, k), scatter(v_pages, v)
