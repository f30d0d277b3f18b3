"""The paper's Table 2: CelebAMask-HQ, 3 single-task and 3 multi-task sets × λ ∈ {0, 1e-5} × 5 trials.

  python -m mtl_sparse_jax.sweep --sweep configs/sweeps/celeba_table2.py --workdir runs/celeba_table2

Needs the converted shards in data/celeba (python -m data_prep.celeba); the base is configs/celeba.py.
"""

from configs import celeba
from mtl_sparse_jax.experiments.sweep import grid

TASK_SETS = [("seg",), ("male",), ("smile",), ("seg", "male"), ("male", "smile"), ("seg", "male", "smile")]


def get_sweep():
    base = celeba.get_config()
    base.num_trials = 5
    return base, grid(tasks=TASK_SETS, **{"sparsity.lam": [0.0, 1e-5]})
