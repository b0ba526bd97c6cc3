"""Triton-style Pallas kernels (``pallas.triton`` loads/stores, ``CompilerParams``).

The Triton lowering is deprecated since jax 0.11; a Mosaic GPU family would sit beside this
one as ``pallas_kernels/mosaic_gpu/`` with the same signatures.
"""
