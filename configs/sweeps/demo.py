"""The embedded sweep: the paper's Table 1 and Fig. 4 in miniature, on the synthetic data, on a 2-core CPU.

  python -m mtl_sparse_jax.sweep --sweep configs/sweeps/demo.py --workdir runs/sweep_demo

A 1/8-width ResNetD-18 on 32×32 synthetic scenes (generated into data/synthetic_32 on first use), 6 epochs of
12 steps, 2 trials per cell. Cells: the three single tasks and the three-task set at λ ∈ {0, 3e-4, 1e-3}
(Table 1), the three-task set at three more λ (Fig. 4), and the three-task set with the unstructured l1 prox
(Table 3) when the config accepts sparsity.prox='l1'. λ and lr are far above the paper's (1e-5, 1e-4) because
the runs are ~100 steps long instead of tens of thousands.
"""

import ml_collections

from configs import default
from mtl_sparse_jax import config_utils
from mtl_sparse_jax.experiments.sweep import grid, union

ALL = ("seg", "normals", "depth")


def base_config():
    c = default.get_config()
    c.dataset = "synthetic"
    c.data.dir = "data/synthetic_32"
    c.data.generate_if_missing = True
    c.data.synthetic_size = 32
    c.data.synthetic_num_train = 384
    c.data.synthetic_num_val = 64
    c.data.synthetic_num_test = 128
    c.data.depth_norm = "fixed"
    c.data.depth_max_m = 10.0
    c.tasks = ALL
    c.seg_num_classes = 6
    c.model.depth = 18
    c.model.width_multiplier = 0.125
    c.model.head_width_multiplier = 0.125
    c.batch_size = 32
    c.eval_batch_size = 64
    c.num_epochs = 6
    c.num_trials = 2
    c.optimizer.lr = 2e-3
    c.optimizer.weight_decay = 1e-4
    c.sparsity.lam = 0.0
    c.early_stopping.patience = 0
    c.early_stopping.task_patience = 0
    c.log.progress = False
    return c


def _accepts_l1(base) -> bool:
    c = ml_collections.ConfigDict(base.to_dict())
    c.sparsity.prox = "l1"
    try:
        config_utils.validate(c)
    except config_utils.ConfigError:
        return False
    return True


def get_sweep():
    base = base_config()
    table1 = grid(tasks=[("seg",), ("normals",), ("depth",), ALL], **{"sparsity.lam": [0.0, 3e-4, 1e-3]})
    fig4 = grid(tasks=[ALL], **{"sparsity.lam": [1e-4, 3e-3, 1e-2]})
    l1 = [{"tasks": ALL, "sparsity.prox": "l1", "sparsity.lam": 1e-3}] if _accepts_l1(base) else []
    return base, union(table1, fig4, l1)
