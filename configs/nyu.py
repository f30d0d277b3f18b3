"""The paper's NYU-v2 setup: seg + normals + depth, ResNetD-50 at 256², global batch 16, 5 trials.

  python -m mtl_sparse_jax.main --config configs/nyu.py --workdir runs/nyu --config.data.dir data/nyu

Data: convert first with `python -m data_prep.nyu --src NYUD_MT --out data/nyu`. One epoch of 795 images takes
about a minute on one modern GPU; early stopping (patience 25) usually ends a trial after 100–300 epochs.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.dataset = "nyu"
    c.data.dir = "data/nyu"
    c.tasks = ("seg", "normals", "depth")
    c.seg_num_classes = 40
    c.model.depth = 50
    c.batch_size = 16
    c.eval_batch_size = 8
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 0.1
    c.sparsity.lam = 1e-5
    c.sparsity.prox = "adaptive"
    c.loss.combiner = "uncertainty"
    c.early_stopping.patience = 25
    c.early_stopping.task_patience = 25
    c.num_epochs = 1000
    c.num_trials = 5
    return c
