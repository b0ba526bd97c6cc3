"""Attention kernels for jaxllm, each beside a pure-jnp reference of the same signature."""

from pallas_kernels.flash_attention import flash_attention, flash_attention_reference
from pallas_kernels.ragged_paged_attention import (
    query_row_layout,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv_pages,
)

__all__ = [
    "flash_attention",
    "flash_attention_reference",
    "query_row_layout",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "write_kv_pages",
]
