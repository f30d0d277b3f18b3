"""The training core's contracts: every config field the step reads changes the step's result (so no stale
compiled step can be reused), equal specs share one compiled step, lr and λ changes do not recompile, the pure
update equals the jitted step, and importing the training package pulls in no TensorFlow, data_prep or configs."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mtl_sparse_jax import training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir, **overrides):
    """tests/tiny_config.py with two tasks (two heads keep each of the many compiles below cheap)."""
    import tiny_config

    c = tiny_config.get_config()
    c.data.dir = str(data_dir)
    c.tasks = ("seg", "depth")
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


@pytest.fixture(scope="module")
def batch_np(tmp_path_factory):
    from data_prep import synthetic
    from mtl_sparse_jax.data import pipeline

    d = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(str(d), num_train=8, num_val=4, num_test=4, image_size=32, seed=0, num_classes=6)
    batch = next(
        pipeline.iterate_batches(
            str(d),
            "train",
            tasks=("seg", "normals", "depth"),
            batch_size=8,
            train=True,
            seed=0,
            epoch=0,
            depth_norm="fixed",
        )
    )
    return d, batch


def _one_step(config, batch_np, devices=None):
    """One jitted train step from the config's fresh state: a flat vector of everything it returns."""
    spec = training.step_spec(config, devices=devices or jax.devices()[:1])
    state = training.create_train_state(spec, (32, 32), 0, learning_rate=config.optimizer.lr, lam=config.sparsity.lam)
    batch = training.put_batch(spec, {k: v for k, v in batch_np.items()})
    stats = training.init_train_stats(spec)
    new_state, losses, stats = training.train_step(spec, state, batch, jax.random.PRNGKey(1), stats)
    leaves = jax.tree.leaves(jax.device_get((new_state.params, new_state.batch_stats, losses, stats)))
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in leaves])


# Each field the step reads, and a value that must change what one step computes. lr and λ are injected
# hyperparameters (not part of the spec), the others are static fields of the spec or of its model and tasks.
FIELD_CHANGES = [
    ("optimizer.lr", 1e-2),
    ("sparsity.lam", 3e-1),
    ("sparsity.prox", "euclidean"),
    ("sparsity.group_rule", r"^backbone/layer.*kernel$"),
    ("sparsity.penalty_in_loss", True),
    ("loss.combiner", "sum"),
    ("loss_resolution", "input"),
    ("tasks", ("seg", "normals")),
    ("model.dtype", "bfloat16"),
    ("model.reference_bn_updates", True),
    ("model.width_multiplier", 0.125),
    ("model.head_width_multiplier", 0.125),
    ("model.output_stride", 16),
    ("optimizer.name", "adam_l2"),
    ("optimizer.b1", 0.5),
    ("optimizer.b2", 0.9),
    ("optimizer.eps", 1e-2),
    ("optimizer.weight_decay", 0.5),
    ("seg_num_logits", 7),
    ("log.train_metrics", False),
]


@pytest.mark.slow
def test_every_field_the_step_reads_changes_its_result(batch_np):
    data_dir, batch = batch_np
    base = _one_step(_config(data_dir), batch)
    again = _one_step(_config(data_dir), batch)
    np.testing.assert_array_equal(base, again)  # deterministic, so any difference below is the field's doing
    unchanged = []
    for key, value in FIELD_CHANGES:
        changed = _one_step(_config(data_dir, **{key: value}), batch)
        if changed.shape == base.shape and np.array_equal(changed, base):
            unchanged.append(key)
    assert not unchanged, f"the step ignored these fields: {unchanged}"


def test_equal_specs_share_one_compiled_step_and_lr_lam_do_not_recompile(batch_np):
    data_dir, batch = batch_np
    config = _config(data_dir, **{"model.width_multiplier": 0.03125})  # a shape no other test compiles
    _one_step(config, batch)
    size = training.train_step._cache_size()
    _one_step(
        _config(data_dir, **{"model.width_multiplier": 0.03125, "optimizer.lr": 1e-2, "sparsity.lam": 1e-1}), batch
    )
    assert training.train_step._cache_size() == size, "an lr / lam change recompiled the step"
    _one_step(_config(data_dir, **{"model.width_multiplier": 0.03125, "loss.combiner": "sum"}), batch)
    assert training.train_step._cache_size() == size + 1, "a different spec must compile its own step"


def test_spec_is_hashable_and_equal_for_equal_configs(batch_np):
    data_dir, _ = batch_np
    a = training.step_spec(_config(data_dir), devices=jax.devices()[:1])
    b = training.step_spec(_config(data_dir), devices=jax.devices()[:1])
    assert a == b and hash(a) == hash(b)
    assert a != training.step_spec(_config(data_dir, **{"sparsity.prox": "euclidean"}), devices=jax.devices()[:1])


def test_pure_update_equals_the_jitted_step(batch_np):
    data_dir, batch = batch_np
    config = _config(data_dir)
    spec = training.step_spec(config, devices=jax.devices()[:1])
    make = lambda: training.create_train_state(  # noqa: E731
        spec, (32, 32), 0, learning_rate=config.optimizer.lr, lam=config.sparsity.lam
    )
    b = training.put_batch(spec, batch)
    pure_state, pure_losses = jax.jit(training.update, static_argnums=0)(spec, make(), b, jax.random.PRNGKey(1))
    jit_state, jit_losses, _ = training.train_step(
        spec, make(), b, jax.random.PRNGKey(1), training.init_train_stats(spec)
    )
    for x, y in zip(
        jax.tree.leaves(jax.device_get((pure_state, pure_losses))),
        jax.tree.leaves(jax.device_get((jit_state, jit_losses))),
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_training_package_imports_no_tensorflow_data_prep_or_configs():
    code = (
        "import sys, mtl_sparse_jax, mtl_sparse_jax.training; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'data_prep', 'configs')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
