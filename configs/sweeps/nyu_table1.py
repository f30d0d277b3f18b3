"""The paper's Table 1: NYU-v2, 3 single-task and 4 multi-task sets × λ ∈ {0, 1e-6, 1e-5} × 5 trials (105 runs).

  python -m mtl_sparse_jax.sweep --sweep configs/sweeps/nyu_table1.py --workdir runs/nyu_table1

Needs the converted NYU-v2 shards in data/nyu (python -m data_prep.nyu); the base is configs/nyu.py.
"""

from configs import nyu
from mtl_sparse_jax.experiments.sweep import grid

TASK_SETS = [
    ("seg",),
    ("depth",),
    ("normals",),
    ("seg", "depth"),
    ("seg", "normals"),
    ("normals", "depth"),
    ("seg", "normals", "depth"),
]


def get_sweep():
    base = nyu.get_config()
    base.num_trials = 5
    return base, grid(tasks=TASK_SETS, **{"sparsity.lam": [0.0, 1e-6, 1e-5]})
