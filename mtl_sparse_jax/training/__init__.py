"""Training: the step's static description (`spec`), the train state (`state`), the pure update and its jitted
wrapper (`step`), evaluation (`evaluation`) and the epoch loop with checkpoints and logs (`loop`).

    config ─step_spec─▶ StepSpec (hashable: model, tasks, optimizer, loss) ─create_train_state─▶ TrainState
    (TrainState, batch, rng) ─update / train_step─▶ TrainState ─loop─▶ checkpoints, metrics.jsonl ─evaluate─▶ test

Public entry points: `train_and_evaluate(config, workdir)` and `evaluate_workdir(config, workdir)`.
"""

from mtl_sparse_jax.training.evaluation import evaluate, prefetch, put_batch
from mtl_sparse_jax.training.loop import (
    EarlyStopper,
    NonFiniteLossError,
    evaluate_trial,
    evaluate_workdir,
    run_trial,
    sparsity_summary,
    train_and_evaluate,
)
from mtl_sparse_jax.training.spec import OptimizerSpec, StepSpec, build_model, build_tasks, make_mesh, step_spec
from mtl_sparse_jax.training.state import (
    LOSS_WEIGHTS_KEY,
    TrainState,
    abstract_train_state,
    create_train_state,
    eval_variables,
    reset_optimizer,
    set_hyperparams,
)
from mtl_sparse_jax.training.step import init_train_stats, train_step, update

__all__ = [
    "LOSS_WEIGHTS_KEY",
    "EarlyStopper",
    "NonFiniteLossError",
    "OptimizerSpec",
    "StepSpec",
    "TrainState",
    "abstract_train_state",
    "build_model",
    "build_tasks",
    "create_train_state",
    "eval_variables",
    "evaluate",
    "evaluate_trial",
    "evaluate_workdir",
    "init_train_stats",
    "make_mesh",
    "prefetch",
    "put_batch",
    "reset_optimizer",
    "run_trial",
    "set_hyperparams",
    "sparsity_summary",
    "step_spec",
    "train_and_evaluate",
    "train_step",
    "update",
]
