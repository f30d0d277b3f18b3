"""Every config field, with its default. `configs/default.py` re-exports it; the other configs import that and
override what they need, and `config_utils.validate` refuses any key that is not here.

The fields `tasks`, `num_epochs`, `batch_size`, `num_trials`, `seed`, `sparsity.lam` and `data.dir` are a
documented contract: they exist with the same meaning in every config (see the README).
"""

import ml_collections

# Our feature names (mtl_sparse_jax.data.spec: the image and the task targets), listed here so that importing a
# config imports nothing else from the package.
_FEATURES = ("image", "seg", "depth", "normals", "edge", "male", "smile", "eyebrows", "glasses")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # Dataset: 'nyu', 'celeba' or 'synthetic'. data.dir holds shards written by data_prep.
    c.dataset = "nyu"
    c.data = ml_collections.ConfigDict()
    c.data.dir = "data/nyu"
    # 'shards': data.dir holds our manifest.json + TFRecord shards. 'tfds': data.dir is a tfds dataset directory
    # (the folder of one version, holding dataset_info.json), read with tfds.builder_from_directory; our
    # converters write both, so either works on their output.
    c.data.format = "shards"
    # data.format='tfds' only: the dataset's feature name for the image and for each task's target (see
    # mtl_sparse_jax/data/tfds_source.py for the shapes and dtypes each must have), e.g.
    # --config.data.features.seg=segmentation. The defaults are the names our converters write.
    c.data.features = ml_collections.ConfigDict({name: name for name in _FEATURES})
    c.data.depth_norm = "reference"  # 'reference' (per-image max, clip [0.1, p99]) | 'fixed' | 'none'
    c.data.depth_max_m = 10.0  # used by depth_norm='fixed'
    c.data.verify = "size"  # manifest check at start: 'size' | 'sha256' | 'none'
    # 'device': each split decoded once into .npy arrays next to the shards (TensorFlow needed that once), kept on
    # every device, batches gathered there; no TensorFlow after that. A split larger than half a device's memory
    # is read with tf.data instead. 'tfdata': TFRecord shards read by tf.data every epoch.
    c.data.loader = "device"
    c.data.generate_if_missing = False  # synthetic only: generate the demo data on first use
    c.data.synthetic_num_train = 768
    c.data.synthetic_num_val = 128
    c.data.synthetic_num_test = 128
    c.data.synthetic_size = 64

    # One list chooses single-task (one entry) or multi-task training.
    c.tasks = ("seg", "normals", "depth")
    c.seg_num_classes = 40  # classes with labels; NYU 40, CelebA 3
    c.seg_num_logits = 0  # 0 = seg_num_classes; the reference used 41 logits on NYU
    c.loss_resolution = "feature"  # 'feature' (targets downsampled, as the reference) | 'input'
    c.double_sigmoid = False  # True reproduces the reference's sigmoid-then-BCE-with-logits

    c.model = ml_collections.ConfigDict()
    c.model.depth = 50  # ResNetD-18 / 50 / 101
    c.model.width_multiplier = 1.0
    c.model.head_width_multiplier = 1.0
    c.model.output_stride = 8
    c.model.dtype = "float32"  # compute dtype; params stay float32
    c.model.reference_bn_updates = False  # True: update backbone BN statistics once per task, as the reference
    # LOMT: heads at backbone taps, 'seg=layer3_3/conv1,depth=layer3_3/conv1' (names from models.tap_names); the
    # tasks not listed read the backbone's end. When every task has a tap the backbone ends at the deepest one.
    c.model.taps = ""
    c.model.tap_point = "conv"  # where a conv tap reads: 'conv' (before BN, as the reference's hooks) | 'bn' | 'relu'

    c.batch_size = 16  # global batch, split over all devices and processes
    c.eval_batch_size = 8
    c.num_epochs = 1000
    c.steps_per_epoch = 0  # 0 = one pass over the train split
    c.num_trials = 5
    c.seed = 0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "prox_adamw"  # 'prox_adamw' | 'adam_l2' (torch Adam with coupled L2, the reference's dense run)
    c.optimizer.lr = 1e-4
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-6
    c.optimizer.weight_decay = 0.1
    c.optimizer.reset_each_epoch = False  # the reference rebuilt its optimizer (moments and step) every epoch

    c.sparsity = ml_collections.ConfigDict()
    c.sparsity.lam = 1e-5  # 0 gives the dense baseline
    c.sparsity.prox = (
        "adaptive"  # 'adaptive' (Adam-weighted, as the reference) | 'euclidean' (paper Eq. 5) | 'l1' (Table 3) | 'none'
    )
    c.sparsity.group_rule = r"^backbone/.*kernel$"
    c.sparsity.penalty_in_loss = False  # the reference also back-propagated lam * sum sqrt(C_in) ||W_c||

    c.loss = ml_collections.ConfigDict()
    c.loss.combiner = (
        "uncertainty"  # 'uncertainty' (learned) | 'uncertainty_reference' (fixed, as the code) | 'sum' | 'fixed'
    )
    c.loss.fixed_weights = ""  # for 'fixed': 'seg=1,depth=2,...'

    c.early_stopping = ml_collections.ConfigDict()
    c.early_stopping.patience = 25  # on the validation total; 0 disables
    c.early_stopping.task_patience = 25  # per task, on its raw validation loss; 0 disables

    c.eval = ml_collections.ConfigDict()
    c.eval.checkpoint = "best"  # 'best' (global best) | 'per_task' (each task from its own best, as main_multi_trials)
    c.eval.train_mode = False  # True reproduces the reference's test in train mode (BN batch stats, dropout on)

    c.log = ml_collections.ConfigDict()
    c.log.progress = True  # one progress bar per epoch
    c.log.train_metrics = True  # task metrics on train batches (train-mode outputs, as the reference)

    # LOMT: the taps of every task from the JSON that `python -m mtl_sparse_jax.lomt select` writes ('' = none;
    # model.taps then applies). A relative path is relative to the working directory.
    c.lomt = ml_collections.ConfigDict()
    c.lomt.layers_file = ""

    # Meta-sparsity (python -m mtl_sparse_jax.main --mode meta_train|meta_test, or meta.enabled with --mode train):
    # λ = exp(ρ) is learned by a MAML-style outer loop that differentiates through the proximal inner steps.
    # `tasks` are the meta-training tasks; `meta.test_tasks` are held out and get new heads at meta-test.
    c.meta = ml_collections.ConfigDict()
    c.meta.enabled = False  # True: --mode train runs meta-training, then meta-test
    c.meta.min_tasks = 1  # episodes draw a subset of `tasks` of at least this size, uniformly
    c.meta.query_split = "val"  # query batches from 'val', or 'train': a held-out part of train (support = the rest)
    c.meta.query_fraction = 0.25  # with query_split='train': the part of train held out as the query set
    c.meta.inner_steps = 1  # K proximal steps per episode on the support batch
    c.meta.inner_optimizer = "prox_adamw"  # 'prox_adamw' (fresh moments) | 'sgd' (+ group_lasso_prox) |
    # 'prox_adamw_warm' (the outer optimizer from its current moments, so the inner prox is the outer one)
    c.meta.inner_lr = 1e-3
    c.meta.order = "second"  # 'second' (through the unrolled steps) | 'first' (FOMAML: ρ gets λ·Ω(θ_K) only)
    # | 'hybrid' (ρ as 'second', θ as 'first': the outer step sees gradients of the ordinary scale)
    c.meta.remat = True  # jax.checkpoint each inner step (memory of one step's activations)
    c.meta.penalty_in_outer = False  # add λ·Ω(θ_K) to the query loss, as the reference's development code
    c.meta.lam_init = 1e-3  # initial λ (> 0)
    c.meta.lam_lr = 0.05  # Adam lr of ρ = log λ
    c.meta.outer_every = 1  # episodes whose meta-gradients are averaged per outer step
    c.meta.test_tasks = ()  # unseen tasks for meta-test, e.g. ('edge',)
    c.meta.test_fraction = 0.5  # part of the train split the unseen task is fine-tuned on
    c.meta.finetune = "all"  # 'all' (backbone and head) | 'head' (backbone frozen)
    c.meta.test_steps = 200  # fine-tuning steps per unseen task and initialisation
    c.meta.test_eval_every = 25  # validation points of the learning curves
    c.meta.baseline_workdir = ""  # an ordinary sparse MTL run to compare; '' trains one in <workdir>/mtl_baseline

    return c
