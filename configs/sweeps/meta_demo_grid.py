"""The λ grid for the meta-sparsity demo: its model and data as ordinary sparse MTL runs over five λ.

  python -m mtl_sparse_jax.sweep --sweep configs/sweeps/meta_demo_grid.py --workdir runs/meta_demo_grid

The base config is `configs/meta_demo.py` with meta-learning off, exactly as the demo's own ordinary baseline
(`<workdir>/mtl_baseline`) trains it: seg + normals + depth, a 1/8-width ResNetD-18 on the same 32×32 synthetic
scenes (data/synthetic_meta), the same number of steps (6 epochs × 32) and one trial per λ ∈ {1e-4, 3e-4, 1e-3,
3e-3, 1e-2}. It is what meta-sparsity's learned λ is compared with (README, meta-sparsity section).
"""

from configs import meta_demo
from mtl_sparse_jax.experiments.sweep import grid


def base_config():
    c = meta_demo.get_config()
    c.meta.enabled = False
    c.meta.test_tasks = ()
    c.num_trials = 1
    return c


def get_sweep():
    return base_config(), grid(**{"sparsity.lam": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]})
