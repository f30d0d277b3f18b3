"""LOMT against conventional MTL on NYU-v2, every pair and the triple of seg, depth and normals, 3 trials each.

  python -m mtl_sparse_jax.sweep --sweep configs/sweeps/lomt_vs_mtl_nyu.py --workdir runs/lomt_vs_mtl_nyu

Reads the taps from runs/lomt_phase1_nyu/lomt_layers.json (`lomt_phase1_nyu.py`, then `lomt select`;
--override.lomt.layers_file=PATH for another). Phase 2 as the reference's NYU config: prox AdamW, lr 1e-4,
weight decay 0.01, λ = 1e-5, early stopping with patience 15; `--override.sparsity.lam=0` trains it dense.
"""

from configs import nyu
from mtl_sparse_jax import lomt

LAYERS_FILE = "runs/lomt_phase1_nyu/lomt_layers.json"
TASK_SETS = [("seg", "depth"), ("seg", "normals"), ("normals", "depth"), ("seg", "normals", "depth")]


def base_config():
    c = nyu.get_config()
    c.num_trials = 3
    c.num_epochs = 800
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 0.01
    c.sparsity.lam = 1e-5
    c.early_stopping.patience = 15
    c.early_stopping.task_patience = 0
    c.lomt.layers_file = LAYERS_FILE
    return c


def get_sweep():
    return base_config(), lomt.comparison_cells(TASK_SETS)
