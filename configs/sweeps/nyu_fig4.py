"""The paper's Fig. 4: NYU-v2, all three tasks, λ ∈ {0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2}, 5 trials.

  python -m mtl_sparse_jax.sweep --sweep configs/sweeps/nyu_fig4.py --workdir runs/nyu_fig4

Writes figures/lambda_metrics.png, lambda_sparsity.png, sparsity_profile.png and lambda_latency.png. Needs data/nyu.
"""

from configs import nyu
from mtl_sparse_jax.experiments.sweep import grid


def get_sweep():
    base = nyu.get_config()
    base.num_trials = 5
    base.tasks = ("seg", "normals", "depth")
    return base, grid(**{"sparsity.lam": [0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2]})
