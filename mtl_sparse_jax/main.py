"""Command line: train, evaluate or benchmark. Kept short on purpose; the work happens in `training`.

python -m mtl_sparse_jax.main --config configs/nyu.py --workdir runs/nyu [--config.sparsity.lam=1e-6]
python -m mtl_sparse_jax.main --mode eval --workdir runs/nyu
python -m mtl_sparse_jax.main --mode bench --workdir runs/nyu
python -m mtl_sparse_jax.main --config configs/meta_demo.py --workdir runs/meta_demo   [--mode meta_train|meta_test]
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/nyu.py; --config.a.b=v overrides a field.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "bench", "meta_train", "meta_test"],
    "train (resumes; meta-training then meta-test when meta.enabled), eval (test split), bench, meta_train, meta_test.",
)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def prepare_demo_data(config) -> None:
    """Generates the synthetic demo dataset on first use: process 0 writes it, the others wait at a barrier."""
    import jax

    data = config.data
    if config.dataset != "synthetic" or not data.generate_if_missing:
        return
    manifest = os.path.join(data.dir, "manifest.json")
    if jax.process_index() == 0 and not os.path.exists(manifest):
        from data_prep import synthetic

        print(f"generating the synthetic demo dataset in {data.dir} (first use)", flush=True)
        synthetic.generate(
            data.dir,
            num_train=data.synthetic_num_train,
            num_val=data.synthetic_num_val,
            num_test=data.synthetic_num_test,
            image_size=data.synthetic_size,
            seed=config.seed,
            num_classes=config.seg_num_classes,
        )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("demo data ready")


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags look like --config.sparsity.lam=1e-6")
    if not FLAGS.workdir:
        _fail("--workdir is required, e.g. --workdir runs/demo")

    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; the console shows progress bars
    import jax  # after flag parsing, so --help is fast

    # Reruns (resume, eval, the demo) skip XLA compilation through a persistent cache.
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/mtl_sparse_jax/xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from mtl_sparse_jax import config_utils, training
    from mtl_sparse_jax.data import spec as data_spec

    try:
        config = FLAGS.config
        if config is None:
            if FLAGS.mode in ("train", "meta_train"):
                _fail("--config is required for training, e.g. --config configs/demo.py")
            config = config_utils.load(os.path.join(FLAGS.workdir, "config.json"))
        if FLAGS.mode == "bench":
            from mtl_sparse_jax import benchmark

            benchmark.run_from_workdir(config, FLAGS.workdir)
            return
        prepare_demo_data(config)
        if FLAGS.mode in ("meta_train", "meta_test") or (FLAGS.mode == "train" and config.meta.enabled):
            from mtl_sparse_jax.meta import run as meta_run

            if FLAGS.mode in ("train", "meta_train"):
                summary = meta_run.meta_train(config, FLAGS.workdir)
                print(
                    f"meta-train: λ {summary['lam_init']:.3g} -> {summary['lam_final']:.3g}, "
                    f"group sparsity {summary['sparsity/group']:.1f}%"
                )
            if FLAGS.mode == "meta_test" or (FLAGS.mode == "train" and config.meta.test_tasks):
                meta_run.meta_test(config, FLAGS.workdir)
                with open(os.path.join(FLAGS.workdir, "meta_test", "meta_test.md")) as f:
                    print(f.read())
            return
        if FLAGS.mode == "train":
            training.train_and_evaluate(config, FLAGS.workdir)
        else:
            training.evaluate_workdir(config, FLAGS.workdir)
        with open(os.path.join(FLAGS.workdir, "results.md")) as f:
            print(f.read())
    except (config_utils.ConfigError, data_spec.DataError, training.NonFiniteLossError, FileNotFoundError) as e:
        _fail(str(e))


if __name__ == "__main__":
    app.run(main)
