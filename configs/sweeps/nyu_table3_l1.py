"""The paper's Table 3: NYU-v2 multi-task sets with the unstructured l1 prox at λ = 1e-3, 5 trials.

  python -m mtl_sparse_jax.sweep --sweep configs/sweeps/nyu_table3_l1.py --workdir runs/nyu_table3_l1

The group-lasso rows to compare with are Table 1's (configs/sweeps/nyu_table1.py). Needs data/nyu.
"""

from configs import nyu
from mtl_sparse_jax.experiments.sweep import grid

TASK_SETS = [("seg", "normals"), ("normals", "depth"), ("seg", "normals", "depth")]


def get_sweep():
    base = nyu.get_config()
    base.num_trials = 5
    return base, grid(tasks=TASK_SETS, **{"sparsity.prox": ["l1"], "sparsity.lam": [1e-3]})
