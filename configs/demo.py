"""The embedded demo: a tiny ResNetD-50 on procedurally generated multi-task scenes, on a laptop CPU.

  pip install -e . && python -m mtl_sparse_jax.main --config configs/demo.py --workdir runs/demo

The data (seg + normals + depth + edges, consistent with each other and with the RGB image) is generated into
data/synthetic on first use. Same network shape as the paper's (deep stem, bottlenecks, dilated stages, DeepLab
heads) at 1/8 of the width, 64×64 inputs, one trial.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.dataset = "synthetic"
    c.data.dir = "data/synthetic"
    c.data.generate_if_missing = True
    c.data.depth_norm = "fixed"
    c.data.depth_max_m = 10.0
    c.tasks = ("seg", "normals", "depth")
    c.seg_num_classes = 6
    c.model.depth = 50
    c.model.width_multiplier = 0.125
    c.model.head_width_multiplier = 0.125
    c.batch_size = 32
    c.eval_batch_size = 64
    c.num_epochs = 20
    c.num_trials = 1
    c.optimizer.lr = 5e-4  # lr·λ = 4e-7: dense at first, then gradually sparser (the paper's Fig. 4c)
    c.optimizer.weight_decay = 1e-4
    c.sparsity.lam = 8e-4
    c.early_stopping.patience = 0
    c.early_stopping.task_patience = 0
    return c
