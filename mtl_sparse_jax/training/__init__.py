"""Training: train state, the pure update step, the epoch loop and evaluation.

Public entry points: `train_and_evaluate(config, workdir)` and `evaluate_workdir(config, workdir)`.
"""

from mtl_sparse_jax.train import evaluate_workdir, train_and_evaluate

__all__ = ["evaluate_workdir", "train_and_evaluate"]
