"""Pallas GPU kernels for any-precision weights (each beside its pure-jnp reference)."""
