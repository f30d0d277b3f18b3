"""LOMT against conventional MTL on CelebAMask-HQ: the task sets of the paper's Table 2, 3 trials each.

  python -m mtl_sparse_jax.sweep --sweep configs/sweeps/lomt_vs_mtl_celeba.py --workdir runs/lomt_vs_mtl_celeba

Reads the taps from runs/lomt_phase1_celeba/lomt_layers.json (`lomt_phase1_celeba.py`, then `lomt select`;
--override.lomt.layers_file=PATH for another). Phase 2 dense as the reference's CelebA config: Adam with coupled
L2 (weight decay 0.1), lr 1e-4, batch 64, early stopping with patience 15.
"""

from configs import celeba
from mtl_sparse_jax import lomt

LAYERS_FILE = "runs/lomt_phase1_celeba/lomt_layers.json"
TASK_SETS = [("seg", "male"), ("male", "smile"), ("seg", "male", "smile")]


def base_config():
    c = celeba.get_config()
    c.num_trials = 3
    c.num_epochs = 300
    c.batch_size = 64
    c.optimizer.name = "adam_l2"
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 0.1
    c.sparsity.lam = 0.0
    c.early_stopping.patience = 15
    c.early_stopping.task_patience = 0
    c.lomt.layers_file = LAYERS_FILE
    return c


def get_sweep():
    return base_config(), lomt.comparison_cells(TASK_SETS)
