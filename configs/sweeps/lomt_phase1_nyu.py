"""LOMT phase 1 on NYU-v2: one sparse single-task run per task, 3 trials each (the reference's phase 1).

  python -m mtl_sparse_jax.sweep --sweep configs/sweeps/lomt_phase1_nyu.py --workdir runs/lomt_phase1_nyu
  python -m mtl_sparse_jax.lomt select --phase1 runs/lomt_phase1_nyu --out runs/lomt_phase1_nyu/lomt_layers.json

The reference's settings: ResNetD-50, prox AdamW with lr 1e-5, weight decay 0.1, λ = 1e-3, batch 16, early
stopping with patience 15. Needs the converted NYU-v2 shards in data/nyu (python -m data_prep.nyu).
"""

from configs import nyu
from mtl_sparse_jax.experiments.sweep import grid

TASKS = ("seg", "depth", "normals", "edge")


def base_config():
    c = nyu.get_config()
    c.num_trials = 3
    c.num_epochs = 800
    c.optimizer.lr = 1e-5
    c.optimizer.weight_decay = 0.1
    c.sparsity.lam = 1e-3
    c.early_stopping.patience = 15
    c.early_stopping.task_patience = 0
    return c


def get_sweep():
    return base_config(), grid(tasks=[(t,) for t in TASKS])
