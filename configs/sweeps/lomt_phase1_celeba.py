"""LOMT phase 1 on CelebAMask-HQ: one sparse single-task run per task, 3 trials each (the reference's phase 1).

  python -m mtl_sparse_jax.sweep --sweep configs/sweeps/lomt_phase1_celeba.py --workdir runs/lomt_phase1_celeba
  python -m mtl_sparse_jax.lomt select --phase1 runs/lomt_phase1_celeba --out runs/lomt_phase1_celeba/lomt_layers.json

The reference's settings: ResNetD-50, prox AdamW with lr 1e-5, weight decay 0.1, λ = 1e-3, batch 32, early
stopping with patience 15. Needs the converted shards in data/celeba (python -m data_prep.celeba).
"""

from configs import celeba
from mtl_sparse_jax.experiments.sweep import grid

TASKS = ("seg", "male", "smile", "eyebrows")


def base_config():
    c = celeba.get_config()
    c.num_trials = 3
    c.num_epochs = 300
    c.optimizer.lr = 1e-5
    c.optimizer.weight_decay = 0.1
    c.sparsity.lam = 1e-3
    c.early_stopping.patience = 15
    c.early_stopping.task_patience = 0
    return c


def get_sweep():
    return base_config(), grid(tasks=[(t,) for t in TASKS])
