"""Pallas kernels, one folder per family, each beside its plain-jnp reference (later issues)."""
