"""Attention implementations, by name: the model asks for one; this registry picks the code.

Each implementation computes the attention of the flat query rows ``q [T, H, d]`` over the
paged cache described by ``AttentionMetadata``, with Llama 4's chunked local mask when
``chunk_size`` is set. ``"pallas"`` (the default on GPU) runs the Triton-style kernels of
``pallas_kernels``; ``"xla"`` (the default elsewhere) runs the blockwise jnp implementation
(memory O(rows * block), whatever the context); ``"reference"`` runs the definition itself,
which materialises every key of every sequence per row (for checks, not for serving).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from jaxllm.layout import AttentionMetadata
from pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.xla.ragged_paged_attention import ragged_paged_attention_blockwise

AttentionFn = Callable[..., jax.Array]  # (q, k_pages, v_pages, meta, *, chunk_size) -> [T, H, d]

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
                    meta: AttentionMetadata, *, chunk_size: int | None, impl: str) -> jax.Array:
    """Attention of ``q [T, H, d]`` over the paged cache with the implementation ``impl``."""
    return _IMPLS[impl](q, k_pages, v_pages, meta, chunk_size=chunk_size)


def _kernel_args(q, k_pages, v_pages, meta: AttentionMetadata) -> tuple:
    return (q, k_pages, v_pages, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.num_seqs)


@register("xla")
def _xla(q, k_pages, v_pages, meta: AttentionMetadata, *, chunk_size: int | None) -> jax.Array:
    return ragged_paged_attention_blockwise(*_kernel_args(q, k_pages, v_pages, meta),
                                            chunk_size=chunk_size)


@register("reference")
def _reference(q, k_pages, v_pages, meta: AttentionMetadata, *, chunk_size: int | None
               ) -> jax.Array:
    return ragged_paged_attention_reference(*_kernel_args(q, k_pages, v_pages, meta),
                                            chunk_size=chunk_size)


@register("pallas")
def _pallas(q, k_pages, v_pages, meta: AttentionMetadata, *, chunk_size: int | None
            ) -> jax.Array:
    # Off GPU the kernel runs in interpret mode: correct, slow, for tests.
    interpret = jax.default_backend() != "gpu"
    return ragged_paged_attention(*_kernel_args(q, k_pages, v_pages, meta),
                                  chunk_size=chunk_size, interpret=interpret)
