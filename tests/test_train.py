"""The main job end to end on tiny synthetic shards: train → checkpoint → eval, resume after a kill,
8 devices against 1, and the error paths. Everything is real (tf.data over shards, orbax, jit over a mesh);
only the network and the data are tiny."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import subproc

from mtl_sparse_jax import config_utils, training
from mtl_sparse_jax.data import spec as data_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, **overrides):
    """tests/tiny_config.py (also used by the CLI tests) with data.dir and dotted-key overrides."""
    import tiny_config as tiny

    return tiny.with_overrides(data_dir, **overrides)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data_prep import synthetic

    d = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(str(d), num_train=24, num_val=11, num_test=13, image_size=32, seed=0, num_classes=6)
    return d


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(data_dir)
    results = training.train_and_evaluate(config, str(workdir))
    return config, workdir, results


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_run_outputs_follow_the_documented_layout(trained):
    config, workdir, results = trained
    trial = workdir / "trial_0"
    assert json.loads((workdir / "config.json").read_text())["sparsity"]["lam"] == config.sparsity.lam
    records = _read_jsonl(trial / "metrics.jsonl")
    assert [(r["epoch"], r["split"]) for r in records] == [(0, "train"), (0, "val"), (1, "train"), (1, "val")]
    for r in records:
        for key in (
            "trial",
            "epoch",
            "split",
            "loss/total",
            "sparsity/group",
            "sparsity/param",
            "lam",
            "lr",
            "images_per_sec",
            "loss/seg",
            "loss/normals",
            "loss/depth",
            "seg/iou_paper",
            "normals/angle_mean",
            "depth/mae_paper",
        ):
            assert key in r, key
        assert np.isfinite(r["loss/total"])
        assert r["lam"] == pytest.approx(config.sparsity.lam) and r["lr"] == pytest.approx(config.optimizer.lr)
    test = json.loads((trial / "test_metrics.json").read_text())
    assert test == results[0]
    assert "seg/iou_paper" in test and "seg/miou" in test and "depth/abs_err_m" in test
    for name in ("sparsity_layers.png", "sparsity_curve.png"):
        assert (trial / name).stat().st_size > 1000
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(trial))
    for name in ("latest", "best", "best_seg", "best_normals", "best_depth"):
        assert (trial / "checkpoints" / name).is_dir(), name
    csv_lines = (workdir / "results.csv").read_text().strip().splitlines()
    assert csv_lines[0].split(",")[:2] == ["trials", "seg/iou_paper"]
    assert "±" in (workdir / "results.md").read_text()


def test_sparsity_is_logged_as_the_prox_produces_it(trained):
    """The logged group sparsity equals the fraction of all-zero input-channel slices of backbone kernels,
    counted here directly on the restored parameters."""
    config, workdir, _ = trained
    spec = training.step_spec(config)
    from mtl_sparse_jax import checkpoint

    ck = checkpoint.TrialCheckpoints(str(workdir / "trial_0" / "checkpoints"))
    state, meta = ck.restore("latest", training.abstract_train_state(spec, (32, 32)))
    ck.close()
    zero = total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params["backbone"])[0]:
        if leaf.ndim == 4:
            norms = np.sqrt((np.asarray(leaf) ** 2).sum(axis=(0, 1, 3)))
            zero += int((norms == 0).sum())
            total += norms.size
    last = [r for r in meta["history"] if r["split"] == "train"][-1]
    assert last["sparsity/group"] == pytest.approx(100.0 * zero / total)
    assert zero > 0, "lam=1e-3 on a tiny net should zero some input channels within two epochs"


def test_eval_mode_restores_on_another_device_count(trained):
    """--mode eval restores the best checkpoint (written with 8 devices) on 1 device and reproduces the test
    metrics that training wrote."""
    config, workdir, results = trained
    assert jax.device_count() == 8
    again = training.evaluate_workdir(config, str(workdir), devices=jax.devices()[:1])
    # Continuous metrics agree to float rounding. Metrics that count pixels on either side of a threshold (the
    # % of normals within 30°, pixel accuracy, IoU) may move by a pixel: XLA's CPU convs differ in the last bit
    # between a per-device batch of 1 and of 13, and the 13 test images hold 13,312 pixels (one is 0.0075 %).
    for k, v in results[0].items():
        if isinstance(v, float):
            discrete = any(s in k for s in ("pct_", "acc", "iou", "f1"))
            pixels = 2 / 13312 * (100 if abs(v) > 1 else 1)
            assert again[0][k] == pytest.approx(v, rel=1e-4, abs=pixels if discrete else 1e-5), k


def test_eight_devices_match_one_device(data_dir, trained):
    """Data-parallel steps over 8 devices equal the same global batches on 1 device (BatchNorm sees the global
    batch). lam = 0 here: the prox's zero test is discontinuous, so a group sitting at the threshold may flip on a
    last-bit difference in reduction order; the prox itself has its own 8-device test in test_sparsity_*."""
    from mtl_sparse_jax.data import pipeline as input_pipeline

    config = tiny_config(data_dir)
    batches = list(
        input_pipeline.iterate_batches(
            str(data_dir), "train", tasks=config.tasks, batch_size=8, train=True, seed=0, epoch=0, depth_norm="fixed"
        )
    )[:2]
    finals = []
    for devices in (jax.devices()[:1], jax.devices()):
        spec = training.step_spec(config, devices=devices)
        assert spec.num_devices == len(devices)
        state = training.create_train_state(spec, (32, 32), 0, learning_rate=config.optimizer.lr, lam=0.0)
        stats = training.init_train_stats(spec)
        losses = []
        for b in batches:
            state, step_losses, stats = training.train_step(
                spec, state, training.put_batch(spec, b), jax.random.PRNGKey(1), stats
            )
            losses.append(float(step_losses["total"]))
        finals.append((losses, jax.device_get(state.params), jax.device_get(state.batch_stats)))
    (l1, p1, b1), (l8, p8, b8) = finals
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    # Adam's first steps move a weight by about lr·sign(g): for a gradient near 0 a last-bit difference in the
    # cross-device reduction order shows up at the scale of lr. So: nearly every element agrees to float
    # precision, and none differs by more than lr/10.
    lr = config.optimizer.lr
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves((p1, b1))])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves((p8, b8))])
    close = np.abs(a - b) <= 1e-6 + 1e-5 * np.abs(b)
    assert close.mean() >= 0.99, (close.mean(), a.size)
    assert np.max(np.abs(a - b)) <= lr / 10


def _cli(args, log=None):
    """Starts the CLI; output goes to `log` (a file: a pipe nobody reads would block the child when full)."""
    env = subproc.device_env(8, PYTHONUNBUFFERED="1")  # as the in-process `trained` run
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen(
        [sys.executable, "-m", "mtl_sparse_jax.main", *args],
        cwd=REPO,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_killed_run_resumes_to_the_same_result(data_dir, trained, tmp_path):
    """Kill (SIGKILL) a CLI run right after its first epoch's checkpoint, rerun: the final test metrics and the
    logged history equal those of the uninterrupted run (the `trained` fixture, same config, 8 devices: a
    1-device process sums in another order than 1 device of this 8-device process, ~1e-5 apart in two epochs)."""
    _, _, uninterrupted = trained
    killed = tmp_path / "killed"
    args = [
        "--config",
        os.path.join(REPO, "tests", "tiny_config.py"),
        f"--config.data.dir={data_dir}",
        f"--workdir={killed}",
    ]
    log = tmp_path / "killed.log"
    proc = _cli(args, log=log)
    jsonl = killed / "trial_0" / "metrics.jsonl"
    deadline = time.time() + 600
    # metrics.jsonl gets epoch 0's lines only after its `latest` checkpoint is finished.
    while time.time() < deadline and proc.poll() is None:
        if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + log.read_text()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "trial_0" / "test_metrics.json").exists()

    resumed = _cli(args)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from epoch 0" in out

    a = json.loads((killed / "trial_0" / "test_metrics.json").read_text())
    b = uninterrupted[0]
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), k
    _, workdir, _ = trained
    ra = _read_jsonl(killed / "trial_0" / "metrics.jsonl")
    rb = _read_jsonl(workdir / "trial_0" / "metrics.jsonl")
    assert [(r["epoch"], r["split"]) for r in ra] == [(r["epoch"], r["split"]) for r in rb]
    for x, y in zip(ra, rb):
        assert x["loss/total"] == pytest.approx(y["loss/total"], rel=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    config = tiny_config(data_dir, num_epochs=1)
    training.train_and_evaluate(config, str(tmp_path))
    os.remove(tmp_path / "trial_0" / "test_metrics.json")  # let the trial continue with more epochs
    exploding = tiny_config(data_dir, num_epochs=3, **{"optimizer.lr": 1e30, "sparsity.lam": 0.0})
    with pytest.raises(training.NonFiniteLossError) as e:
        training.train_and_evaluate(exploding, str(tmp_path))
    msg = str(e.value)
    assert "non-finite loss at step" in msg and "epoch 1" in msg and "last good checkpoint (epoch 0)" in msg
    assert ("task '" in msg) or ("total loss" in msg)
    assert "\n" not in msg
    from mtl_sparse_jax import checkpoint

    ck = checkpoint.TrialCheckpoints(str(tmp_path / "trial_0" / "checkpoints"))
    assert ck.latest_epoch("latest") == 0
    ck.close()


def test_config_errors_name_the_key_and_the_fix(data_dir):
    c = tiny_config(data_dir)
    c.sparsity.lamda = 1.0
    with pytest.raises(
        config_utils.ConfigError, match=r"unknown config key 'sparsity.lamda'.*did you mean 'sparsity.lam'"
    ):
        config_utils.validate(c)
    with pytest.raises(config_utils.ConfigError, match=r"unknown task 'segm'.*known tasks"):
        config_utils.validate(tiny_config(data_dir, tasks=("segm", "depth")))
    with pytest.raises(config_utils.ConfigError, match=r"'optimizer.name'.*choose one of"):
        config_utils.validate(tiny_config(data_dir, **{"optimizer.name": "sgd"}))


def test_missing_data_dir_is_a_one_line_error(tmp_path):
    config = tiny_config(tmp_path / "nope")
    with pytest.raises(data_spec.DataError) as e:
        training.train_and_evaluate(config, str(tmp_path / "run"))
    assert str(tmp_path / "nope") in str(e.value) and "\n" not in str(e.value)


def test_cli_rejects_unknown_override_and_missing_data(tmp_path):
    p = _cli(["--config", "configs/demo.py", f"--workdir={tmp_path}", "--config.sparsity.lamda=1"])
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0 and "lamda" in out
    p = _cli(["--config", "configs/nyu.py", f"--workdir={tmp_path}", f"--config.data.dir={tmp_path}/missing"])
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2
    err_lines = [l for l in out.splitlines() if l.startswith("error:")]
    assert len(err_lines) == 1 and f"{tmp_path}/missing" in err_lines[0], out


def test_stopped_task_head_is_frozen_and_leaves_the_loss(data_dir, trained):
    """Per-task early stopping: with task_active['depth'] = 0 a step leaves head_depth exactly unchanged (no
    gradient step, no weight decay) while the other heads and the backbone move, and the total loss no longer
    contains the depth term."""
    from mtl_sparse_jax.data import pipeline as input_pipeline

    config = tiny_config(data_dir)
    spec = training.step_spec(config, devices=jax.devices()[:1])
    update = jax.jit(training.update, static_argnums=0)  # the pure update, compiled once for both cases
    batch = training.put_batch(
        spec,
        next(
            input_pipeline.iterate_batches(
                str(data_dir),
                "train",
                tasks=config.tasks,
                batch_size=8,
                train=True,
                seed=0,
                epoch=0,
                depth_norm="fixed",
            )
        ),
    )
    totals = {}
    for active in (1.0, 0.0):
        state = training.create_train_state(
            spec, (32, 32), 0, learning_rate=config.optimizer.lr, lam=config.sparsity.lam
        )
        before = jax.device_get(state.params)
        state = state.replace(task_active={**state.task_active, "depth": jnp.float32(active)})
        state, losses = update(spec, state, batch, jax.random.PRNGKey(1))
        after = jax.device_get(state.params)
        totals[active] = float(losses["total"])
        depth_moved = any(
            np.any(a != b) for a, b in zip(jax.tree.leaves(before["head_depth"]), jax.tree.leaves(after["head_depth"]))
        )
        assert depth_moved == (active == 1.0)
        for name in ("head_seg", "backbone"):
            assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])))
    # Learned uncertainty weighting starts at s = 0, so each active task adds 0.5 * L_t to the total.
    assert totals[1.0] - totals[0.0] == pytest.approx(0.5 * float(losses["depth"]), rel=1e-4)
