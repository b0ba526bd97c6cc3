"""Attention and grouped-GEMM kernels for jaxllm, grouped by family, each matched to a pure-jnp
reference.

``reference/`` holds the definitions; ``triton/`` the Triton-style Pallas kernels of the same
signatures. Callers pick an attention implementation through ``jaxllm.model.attention``; the
quantized experts' grouped GEMM is called by ``jaxllm.model.quant``.
"""

from pallas_kernels.reference.flash_attention import flash_attention_reference
from pallas_kernels.reference.grouped_matmul import grouped_matmul_reference
from pallas_kernels.reference.ragged_paged_attention import (
    query_row_layout,
    ragged_paged_attention_reference,
)
from pallas_kernels.triton.common import targets_gpu
from pallas_kernels.triton.flash_attention import flash_attention
from pallas_kernels.triton.grouped_matmul import grouped_matmul
from pallas_kernels.triton.ragged_paged_attention import ragged_paged_attention

__all__ = [
    "flash_attention",
    "flash_attention_reference",
    "grouped_matmul",
    "grouped_matmul_reference",
    "query_row_layout",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "targets_gpu",
]
