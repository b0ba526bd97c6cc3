"""Attention implementations, by name: the model asks for one; this registry picks the code.

Each implementation computes the attention of the flat query rows ``q [T, H, d]`` over the
paged cache described by ``AttentionMetadata``, with Llama 4's chunked local mask when
``chunk_size`` is set. ``"pallas"`` (the default on GPU) runs the Triton-style kernels of
``pallas_kernels``; ``"xla"`` (the default elsewhere) runs the blockwise jnp implementation
(memory O(rows * block), whatever the context); ``"reference"`` runs the definition itself,
which materialises every key of every sequence per row (for checks, not for serving).

On a mesh that splits the heads, a ``pallas_call`` is not partitioned by XLA (it would run on
all-gathered q and KV pages), so the Pallas kernel runs per shard under ``shard_map``: each
device attends with its own q heads over its own kv heads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax.sharding import Mesh, PartitionSpec

from jaxllm.kv_cache import KV_CACHE_AXES
from jaxllm.layout import AttentionMetadata
from jaxllm.sharding import logical_spec
from pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference, targets_gpu
from pallas_kernels.xla.ragged_paged_attention import ragged_paged_attention_blockwise

# (q, k_pages, v_pages, meta, *, chunk_size, mesh) -> [T, H, d]
AttentionFn = Callable[..., jax.Array]

_IMPLS: dict[str, AttentionFn] = {}


def register(name: str) -> Callable[[AttentionFn], AttentionFn]:
    """Adds an implementation under ``name`` (a new kernel family registers itself here)."""

    def add(fn: AttentionFn) -> AttentionFn:
        if name in _IMPLS:
            raise ValueError(f"attention implementation {name!r} is already registered")
        _IMPLS[name] = fn
        return fn

    return add


def attention_impls() -> tuple[str, ...]:
    return tuple(_IMPLS)


def default_attention_impl() -> str:
    """Pallas on GPU; the pure-jnp path elsewhere (interpret mode is for tests only)."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def check_attention_impl(impl: str | None) -> str:
    impl = default_attention_impl() if impl is None else impl
    if impl not in _IMPLS:
        raise ValueError(f"attention_impl={impl!r}: expected one of {attention_impls()}")
    return impl


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                    meta: AttentionMetadata, *, chunk_size: int | None, impl: str,
                    mesh: Mesh | None = None) -> jax.Array:
    """Attention of ``q [T, H, d]`` over the paged cache with the implementation ``impl``
    (``mesh``: the one q and the cache are sharded on)."""
    return _IMPLS[impl](q, k_pages, v_pages, meta, chunk_size=chunk_size, mesh=mesh)


def _kernel_args(q, k_pages, v_pages, meta: AttentionMetadata) -> tuple:
    return (q, k_pages, v_pages, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.num_seqs)


@register("xla")
def _xla(q, k_pages, v_pages, meta: AttentionMetadata, *, chunk_size: int | None,
         mesh: Mesh | None) -> jax.Array:
    # Plain jnp: XLA partitions it over any mesh.
    return ragged_paged_attention_blockwise(*_kernel_args(q, k_pages, v_pages, meta),
                                            chunk_size=chunk_size)


@register("reference")
def _reference(q, k_pages, v_pages, meta: AttentionMetadata, *, chunk_size: int | None,
               mesh: Mesh | None) -> jax.Array:
    return ragged_paged_attention_reference(*_kernel_args(q, k_pages, v_pages, meta),
                                            chunk_size=chunk_size)


def head_shard_specs(q_shape: tuple[int, ...], kv_shape: tuple[int, ...], mesh: Mesh | None
                     ) -> tuple[PartitionSpec, PartitionSpec] | None:
    """(q spec, KV page spec) splitting q heads and kv heads over the same mesh axis, or None
    when the cache's kv heads are not split (then every device needs every head)."""
    if mesh is None or mesh.size == 1:
        return None
    kv_spec = logical_spec(KV_CACHE_AXES, kv_shape, mesh)
    q_spec = logical_spec((None, "heads", None), q_shape, mesh)
    if kv_spec[2] is None or kv_spec[2] != q_spec[1]:
        return None
    return PartitionSpec(None, q_spec[1], None), PartitionSpec(None, None, kv_spec[2], None)


@register("pallas")
def _pallas(q, k_pages, v_pages, meta: AttentionMetadata, *, chunk_size: int | None,
            mesh: Mesh | None) -> jax.Array:
    # Off GPU the kernel runs in interpret mode: correct, slow, for tests. A deviceless
    # compile for a GPU traces on the CPU backend, so ask the target, not the backend.
    kernel = functools.partial(ragged_paged_attention, chunk_size=chunk_size,
                               interpret=not targets_gpu())
    args = _kernel_args(q, k_pages, v_pages, meta)
    specs = head_shard_specs(q.shape, k_pages.shape, mesh)
    if specs is None:
        return kernel(*args)
    q_spec, kv_spec = specs
    rep = PartitionSpec()
    # check_vma=False: the pallas_call's out_shape carries no varying-axes annotation.
    return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec) + (rep,) * 4,
                         out_specs=q_spec, check_vma=False)(*args)
