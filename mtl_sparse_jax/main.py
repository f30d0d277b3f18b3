"""Command line: train, evaluate or benchmark. Kept short on purpose; the work happens in `training`.

python -m mtl_sparse_jax.main --config configs/nyu.py --workdir runs/nyu [--config.sparsity.lam=1e-6]
python -m mtl_sparse_jax.main --mode eval --workdir runs/nyu
python -m mtl_sparse_jax.main --mode bench --workdir runs/nyu
python -m mtl_sparse_jax.main --config configs/meta_demo.py --workdir runs/meta_demo   [--mode meta_train|meta_test]

Several processes (one per host, see launch.sh and the README's "Several hosts"): under SLURM or Open MPI the
runtime finds the others by itself; by hand, give --coordinator_address, --num_processes and --process_id.
"""

import os
import sys

from mtl_sparse_jax import cli

if not cli.debug_requested():
    cli.quiet_tensorflow()  # before anything imports TensorFlow

from absl import flags  # noqa: E402
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
flags.DEFINE_bool("debug", False, cli.DEBUG_HELP)
flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Start the multi-process runtime (jax.distributed). auto: when --coordinator_address is given or SLURM / "
    "Open MPI started more than one task.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, reachable from every process.")
flags.DEFINE_integer("num_processes", None, "Number of processes (by hand; SLURM and Open MPI say it themselves).")
flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes) (by hand).")
flags.DEFINE_integer(
    "heartbeat_timeout", 30, "Seconds without a heartbeat after which a process counts as dead and the others exit."
)
flags.DEFINE_integer("init_timeout", 300, "Seconds to wait for every process to join at start-up.")
flags.DEFINE_integer("shutdown_timeout", 30, "Seconds a finishing process waits for the others to finish too.")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _cluster_task_count() -> int:
    """Tasks started by SLURM (srun) or Open MPI (mpirun) for this job step; 1 outside them."""
    for var in ("OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS"):  # what jax.distributed reads too
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


def init_distributed() -> None:
    """Starts jax.distributed when launched as one of several processes; must run before any device use.

    A process that loses contact with the others (one died or hangs) fails with a runtime error once
    --heartbeat_timeout has passed, so a broken run ends instead of hanging; rerunning the command resumes.
    """
    import jax

    by_hand = FLAGS.coordinator_address is not None or FLAGS.num_processes is not None or FLAGS.process_id is not None
    if FLAGS.distributed == "off" or (FLAGS.distributed == "auto" and not by_hand and _cluster_task_count() < 2):
        return
    if by_hand and None in (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id):
        _fail("--coordinator_address, --num_processes and --process_id go together; give all three or none")
    if by_hand and not 0 <= FLAGS.process_id < FLAGS.num_processes:
        _fail(f"--process_id={FLAGS.process_id} is not in [0, --num_processes={FLAGS.num_processes})")
    try:
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
            initialization_timeout=FLAGS.init_timeout,
            heartbeat_timeout_seconds=FLAGS.heartbeat_timeout,
            shutdown_timeout_seconds=FLAGS.shutdown_timeout,
        )
    except (ValueError, RuntimeError) as e:  # no cluster found, or the others did not join in --init_timeout
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        _fail(
            f"the multi-process runtime did not start ({first}); check --coordinator_address (reachable from "
            f"every process), --num_processes and --process_id, or run under srun / mpirun"
        )
    _connect_collectives()


def _connect_collectives() -> None:
    """Runs the collectives of training once while every process is at the same point (just started).

    On the CPU, gloo connects a group of devices at its first collective and fails if one process arrives more
    than 30 s after another (later waits are unbounded); compiling or loading data can take longer than that
    on a busy host. Training reduces over all devices, the metric broadcast over the processes.
    """
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))  # as training.make_mesh
    ones = np.ones(jax.local_device_count(), np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), ones)
    total = jax.jit(lambda v: v.sum(), out_shardings=NamedSharding(mesh, P()))(x)
    if float(total) != jax.device_count():
        raise RuntimeError(f"a sum over all {jax.device_count()} devices gave {float(total)}")
    multihost_utils.sync_global_devices("mtl_sparse_jax: all processes started")


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags look like --config.sparsity.lam=1e-6")
    if not FLAGS.workdir:
        _fail("--workdir is required, e.g. --workdir runs/demo")

    from absl import logging

    # orbax logs every save at INFO, and its writer threads log a failed write at ERROR before the error reaches the
    # boundary, which reports it as one line; the console shows progress bars and our own messages.
    logging.set_verbosity(logging.FATAL)
    import jax  # after flag parsing, so --help is fast

    init_distributed()

    # Reruns (resume, eval, the demo) skip XLA compilation through a persistent cache.
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/mtl_sparse_jax/xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from mtl_sparse_jax import checkpoint, config_utils, training
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
        config_utils.validate(config)  # before anything (the demo data included) is written
        cli.prepare_demo_data(config)
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
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            # Process 0 writes the last outputs after the last collective; the others wait for it here rather
            # than at the runtime's shutdown barrier, which gives up after --shutdown_timeout.
            multihost_utils.sync_global_devices("mtl_sparse_jax: outputs written")
        if jax.process_index() == 0:  # the writer of results.md
            with open(os.path.join(FLAGS.workdir, "results.md")) as f:
                print(f.read())
    except (
        config_utils.ConfigError,
        data_spec.DataError,
        training.NonFiniteLossError,
        checkpoint.CheckpointError,
        FileNotFoundError,
    ) as e:
        _fail(str(e))


if __name__ == "__main__":
    code = cli.run_absl(main)
    if code:
        # After an error, leave without the interpreter's shutdown: orbax's and JAX's background threads would print
        # their own tracebacks behind the one-line error.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
