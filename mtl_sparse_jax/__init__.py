"""mtl-sparse-jax: parsimonious multi-task vision models with structured (channel-group) sparsity.

Importing the package needs only JAX, Flax and optax; TensorFlow is imported lazily by the input
pipeline and by `data_prep`, so that models, the optimizer and the benchmarks run on a machine that
has JAX and nothing else.
"""

__version__ = "0.1.0"
