"""A tiny config for CLI tests: ResNetD-18 at 1/16 width on 32×32 synthetic shards (data.dir set by the test)."""

from configs import default


def get_config():
    c = default.get_config()
    c.dataset = "synthetic"
    c.data.dir = ""
    c.data.depth_norm = "fixed"
    c.tasks = ("seg", "normals", "depth")
    c.seg_num_classes = 6
    c.model.depth = 18
    c.model.width_multiplier = 0.0625
    c.model.head_width_multiplier = 0.0625
    c.batch_size = 8
    c.eval_batch_size = 8
    c.num_epochs = 2
    c.num_trials = 1
    c.optimizer.lr = 3e-3
    c.optimizer.weight_decay = 1e-4
    c.sparsity.lam = 1e-3
    c.early_stopping.patience = 0
    c.early_stopping.task_patience = 0
    c.log.progress = False
    return c


def with_overrides(data_dir, **overrides):
    """get_config() with data.dir set and dotted-key overrides, e.g. with_overrides(d, **{"optimizer.lr": 1e-3})."""
    c = get_config()
    c.data.dir = str(data_dir)
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c
