"""Each op written from its definition in plain jnp: the semantics every kernel family matches."""
