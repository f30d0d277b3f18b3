"""LOMT phase 1 on the synthetic data: one sparse single-task run per task, 2 trials each, on a 2-core CPU.

  python -m mtl_sparse_jax.sweep --sweep configs/sweeps/lomt_phase1_demo.py --workdir runs/lomt_phase1
  python -m mtl_sparse_jax.lomt select --phase1 runs/lomt_phase1 --out runs/lomt_phase1/lomt_layers.json

The demo sweep's model and data (`configs/sweeps/demo.py`: a 1/8-width ResNetD-18 on 32×32 scenes, 6 epochs of 12
steps). λ is chosen per task, as the reference's per-task grid search did: large enough that ~70 steps empty
whole trailing convs, which is what the selection looks for, and small enough that some conv stays active in
both trials (in trial runs, depth at λ = 1e-2 lost every group, and the two normals trials at 1e-2 kept
disjoint convs, so that no conv was active in both).
"""

from configs.sweeps import demo

LAM = {"seg": 1e-2, "normals": 3e-3, "depth": 3e-4}


def base_config():
    c = demo.base_config()
    c.num_trials = 2
    c.sparsity.lam = LAM["seg"]
    return c


def get_sweep():
    return base_config(), [{"tasks": (task,), "sparsity.lam": lam} for task, lam in LAM.items()]
