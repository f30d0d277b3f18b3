"""CelebAMask-HQ: 3-class face segmentation + male + smile, global batch 32, λ = 1e-5, patience 10.

python -m data_prep.celeba --src CelebAMask-HQ --out data/celeba
python -m mtl_sparse_jax.main --config configs/celeba.py --workdir runs/celeba
"""

from configs import default


def get_config():
    c = default.get_config()
    c.dataset = "celeba"
    c.data.dir = "data/celeba"
    c.tasks = ("seg", "male", "smile")
    c.seg_num_classes = 3
    c.batch_size = 32
    c.eval_batch_size = 32
    c.sparsity.lam = 1e-5
    c.early_stopping.patience = 10
    c.early_stopping.task_patience = 10
    c.num_trials = 5
    return c
