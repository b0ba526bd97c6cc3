"""The one attention switch: Pallas kernels on GPU, the pure-jnp definition elsewhere."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax

from pallas_kernels import ragged_paged_attention_reference

if TYPE_CHECKING:
    from jaxllm.model import AttentionMetadata

ATTENTION_IMPLS = ("pallas", "xla")


def default_attention_impl() -> str:
    """Pallas on GPU; the pure-jnp path elsewhere (interpret mode is for tests only)."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def check_attention_impl(impl: str | None) -> str:
    impl = default_attention_impl() if impl is None else impl
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r}: expected one of {ATTENTION_IMPLS}")
    return impl


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    meta: AttentionMetadata,
    *,
    chunk_size: int | None,
    impl: str,
) -> jax.Array:
    """Attention of the flat query rows ``q [T, H, d]`` over the paged cache."""
    args = (q, k_pages, v_pages, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.num_seqs)
    if impl == "pallas":
        from pallas_kernels import ragged_paged_attention

        # Off GPU the kernel runs in interpret mode: correct, slow, for tests.
        interpret = jax.default_backend() != "gpu"
        return ragged_paged_attention(*args, chunk_size=chunk_size, interpret=interpret)
    return ragged_paged_attention_reference(*args, chunk_size=chunk_size)
