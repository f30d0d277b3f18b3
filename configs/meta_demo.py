"""Meta-sparsity demo: λ learned by a MAML-style outer loop (exact hypergradient of λ) on synthetic scenes, then
meta-test on an unseen task ('edge') against an ordinary sparse MTL backbone and training from scratch. 2-core CPU.

  python -m mtl_sparse_jax.main --config configs/meta_demo.py --workdir runs/meta_demo

Meta-trains on seg + normals + depth (episodes over all non-empty task subsets, support = a train batch,
query = a val batch, one inner step of the outer proximal AdamW from its current moments, order 'hybrid'),
writes runs/meta_demo/meta_train/ (lambda_trajectory.png, metrics.jsonl, meta.jsonl), trains the ordinary
sparse MTL model with the same number of steps at a hand-set λ (runs/meta_demo/mtl_baseline/), then
fine-tunes an 'edge' head on each backbone (runs/meta_demo/meta_test/).
The data (32×32) is generated into data/synthetic_meta on first use. Wall time: see the README.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.dataset = "synthetic"
    c.data.dir = "data/synthetic_meta"
    c.data.generate_if_missing = True
    c.data.synthetic_size = 32
    c.data.synthetic_num_train = 512
    c.data.synthetic_num_val = 128
    c.data.synthetic_num_test = 128
    c.data.depth_norm = "fixed"
    c.data.depth_max_m = 10.0
    c.tasks = ("seg", "normals", "depth")
    c.seg_num_classes = 6
    c.model.depth = 18
    c.model.width_multiplier = 0.125
    c.model.head_width_multiplier = 0.0625
    c.batch_size = 16
    c.eval_batch_size = 64
    c.num_epochs = 6
    c.steps_per_epoch = 32
    c.num_trials = 1
    c.optimizer.lr = 2e-3
    c.optimizer.weight_decay = 1e-4
    c.sparsity.lam = 1e-3  # the ordinary sparse MTL baseline's hand-set λ (meta-training learns its own)
    c.loss.combiner = "sum"  # the outer objective is then Σ_{t∈S} L_t(θ_K; query)
    c.early_stopping.patience = 0
    c.early_stopping.task_patience = 0
    c.log.progress = False
    c.meta.enabled = True
    c.meta.inner_steps = 1
    c.meta.inner_optimizer = "prox_adamw_warm"  # the inner step is the outer optimizer's own step (same prox, same d)
    c.meta.inner_lr = 2e-3  # = optimizer.lr
    c.meta.order = "hybrid"  # exact dF/dρ; θ gets the query gradient at θ_K (ordinary scale, see the README)
    c.meta.remat = False  # a tiny model needs no rematerialisation, and XLA on the CPU compiles faster without it
    c.meta.lam_init = 1e-3
    c.meta.lam_lr = 0.05
    c.meta.test_tasks = ("edge",)
    c.meta.test_fraction = 0.25
    c.meta.finetune = "all"
    c.meta.test_steps = 60
    c.meta.test_eval_every = 15
    return c
