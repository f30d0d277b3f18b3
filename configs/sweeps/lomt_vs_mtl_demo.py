"""LOMT against conventional MTL on the synthetic data, after `lomt_phase1_demo.py` and `lomt select`:

  python -m mtl_sparse_jax.sweep --sweep configs/sweeps/lomt_vs_mtl_demo.py --workdir runs/lomt_vs_mtl

Each task set runs twice: once with every head at the backbone's end (`<tasks>__mtl`) and once with the heads at
the taps of the layers file (`<tasks>__lomt`, backbone truncated after the deepest tap). Both are dense (λ = 0),
2 trials each, on the phase-1 demo's model and data. `--override.lomt.layers_file=PATH` reads another layers
file. The report adds tables/lomt_vs_mtl.md.
"""

from configs.sweeps import lomt_phase1_demo
from mtl_sparse_jax import lomt

LAYERS_FILE = "runs/lomt_phase1/lomt_layers.json"
TASK_SETS = [("seg", "normals"), ("seg", "depth"), ("seg", "normals", "depth")]


def base_config():
    c = lomt_phase1_demo.base_config()
    c.sparsity.lam = 0.0
    c.lomt.layers_file = LAYERS_FILE
    return c


def get_sweep():
    return base_config(), lomt.comparison_cells(TASK_SETS)
