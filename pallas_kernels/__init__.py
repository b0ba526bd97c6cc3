"""Attention kernels for jaxllm, each beside a pure-jnp reference of the same signature."""

from pallas_kernels.ragged_paged_attention import (
    query_row_layout,
    ragged_paged_attention_reference,
    write_kv_pages,
)

__all__ = ["query_row_layout", "ragged_paged_attention_reference", "write_kv_pages"]
