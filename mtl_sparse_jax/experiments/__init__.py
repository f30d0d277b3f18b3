"""Studies made of many runs: sweep files and their runner (`sweep`), the paper's tables (`tables`) and figures
(`figures`). The command line is `python -m mtl_sparse_jax.sweep`."""

from mtl_sparse_jax.experiments.sweep import Cell, Sweep, SweepError, grid, load_sweep, product, union

__all__ = ["Cell", "Sweep", "SweepError", "grid", "load_sweep", "product", "union"]
