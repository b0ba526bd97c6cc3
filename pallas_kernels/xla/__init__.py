"""Plain-XLA (jnp) implementations that are fast enough to serve with where Pallas does not
run: blockwise, with bounded memory, and the same signatures as the references."""
