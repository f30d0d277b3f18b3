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


def _step_inputs(config, batch_np):
    spec = training.step_spec(config, devices=jax.devices()[:1])
    state = training.create_train_state(spec, (32, 32), 0, learning_rate=config.optimizer.lr, lam=config.sparsity.lam)
    return spec, state, training.put_batch(spec, batch_np), training.init_train_stats(spec)


def _one_step(config, batch_np):
    """One jitted train step from the config's fresh state: a flat vector of everything it returns."""
    spec, state, batch, stats = _step_inputs(config, batch_np)
    new_state, losses, stats = training.train_step(spec, state, batch, jax.random.PRNGKey(1), stats)
    leaves = jax.tree.leaves(jax.device_get((new_state.params, new_state.batch_stats, losses, stats)))
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in leaves])


def _lowered_step(config, batch_np) -> str:
    """The train step's program for this config (StableHLO text), lowered from abstract inputs: nothing compiles."""
    spec = training.step_spec(config, devices=jax.devices()[:1])
    state = training.abstract_train_state(spec, (32, 32))
    batch = training.put_batch(spec, batch_np)
    return training.train_step.lower(
        spec, state, batch, jax.random.PRNGKey(1), training.init_train_stats(spec)
    ).as_text()


# Each field the step reads, and a value that must change what the step computes. lr and λ are injected
# hyperparameters: one compiled program serves every value, so a change must show in the step's numbers. Every other
# field is static (part of the StepSpec, its model or its tasks): a change must give another program, so jit cannot
# reuse a compiled step that was built for the old value.
INJECTED_CHANGES = [("optimizer.lr", 1e-2), ("sparsity.lam", 3e-1)]
STATIC_CHANGES = [
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
    ("model.taps", "seg=layer2_0/conv1"),
]


def test_lr_and_lam_change_the_step_result_without_recompiling(batch_np):
    data_dir, batch = batch_np
    base = _one_step(_config(data_dir), batch)
    np.testing.assert_array_equal(base, _one_step(_config(data_dir), batch))  # deterministic
    size = training.train_step._cache_size()
    for key, value in INJECTED_CHANGES:
        changed = _one_step(_config(data_dir, **{key: value}), batch)
        assert changed.shape == base.shape and not np.array_equal(changed, base), f"the step ignored {key}"
    assert training.train_step._cache_size() == size, "an lr / lam change compiled another step"


def test_every_static_field_the_step_reads_changes_its_program(batch_np):
    data_dir, batch = batch_np
    base = _lowered_step(_config(data_dir), batch)
    assert base == _lowered_step(_config(data_dir), batch)  # an equal config lowers to the same program
    unchanged = [k for k, v in STATIC_CHANGES if _lowered_step(_config(data_dir, **{k: v}), batch) == base]
    assert not unchanged, (
        f"the step's program ignores these fields (a stale compiled step would be reused): {unchanged}"
    )


def test_equal_configs_give_equal_specs_that_share_one_compiled_step(batch_np):
    data_dir, batch = batch_np
    a = training.step_spec(_config(data_dir), devices=jax.devices()[:1])
    b = training.step_spec(_config(data_dir), devices=jax.devices()[:1])
    assert a == b and hash(a) == hash(b) and a is not b
    assert a != training.step_spec(_config(data_dir, **{"sparsity.prox": "euclidean"}), devices=jax.devices()[:1])
    _one_step(_config(data_dir), batch)
    size = training.train_step._cache_size()
    _one_step(_config(data_dir), batch)  # a new, equal spec
    assert training.train_step._cache_size() == size


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
