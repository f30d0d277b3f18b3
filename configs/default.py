"""Every config field with its default and a comment: see mtl_sparse_jax/defaults.py (the library validates
configs against it). The other configs import this and override what they need."""

from mtl_sparse_jax.defaults import get_config

__all__ = ["get_config"]
