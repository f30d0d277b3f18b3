"""LOMT phase 1 on the synthetic data: one sparse single-task run per task, 2 trials each, on a 2-core CPU.

  python -m mtl_sparse_jax.sweep --sweep configs/sweeps/lomt_phase1_demo.py --workdir runs/lomt_phase1
  python -m mtl_sparse_jax.lomt select --phase1 runs/lomt_phase1 --out runs/lomt_phase1/lomt_layers.json

The demo sweep's model and data (`configs/sweeps/demo.py`: a 1/8-width ResNetD-18 on 32×32 scenes) with a λ large
enough that ~100 steps empty whole trailing convs, which is what the selection looks for.
"""

from configs.sweeps import demo
from mtl_sparse_jax.experiments.sweep import grid

TASKS = ("seg", "normals", "depth")
LAM = 1e-2


def base_config():
    c = demo.base_config()
    c.num_trials = 2
    c.sparsity.lam = LAM
    return c


def get_sweep():
    return base_config(), grid(tasks=[(t,) for t in TASKS])
