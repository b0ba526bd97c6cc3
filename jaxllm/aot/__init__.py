"""Compiling jaxllm's programs for a GPU that is not there (deviceless, ahead of time).

XLA's real GPU compiler (with ``ptxas``) runs on a CPU-only machine against a compile-only
device described by a ``GpuTargetConfig`` (``h100_sxm.txtpb``, XLA's own H100 SXM spec).
``target`` builds the compile-only meshes and reads what a compile produced (registers,
spills, launches, collectives, memory); ``cases`` lists the programs the project checks;
``scripts/compile_gpu.py`` runs them. Needs a jax with the CUDA plugin (jax >= 0.11 on
Python 3.12 here) and ``JAX_PLATFORMS=cpu``.
"""
