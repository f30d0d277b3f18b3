"""Bad input and faults against the training and benchmark command lines, run as real subprocesses.

Each case checks the README's promise: exit code 2, exactly one `error:` line on stderr that names the file or
key and the fix, no traceback, no TensorFlow start-up lines, and the earlier good run still readable (its
config.json, checkpoints and test metrics untouched). The fault cases kill a run while it writes a checkpoint,
truncate checkpoints and fill a small tmpfs.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from test_bad_input_prep import assert_one_line_error, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "tiny_config.py")


def _tiny(data_dir, **overrides):
    """tests/tiny_config.py (also used by the CLI tests) with data.dir and dotted-key overrides."""
    import tiny_config as tiny

    return tiny.with_overrides(data_dir, **overrides)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data_prep import synthetic

    d = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(str(d), num_train=16, num_val=8, num_test=8, image_size=32, seed=0, num_classes=6)
    return str(d)


@pytest.fixture(scope="module")
def good_run(data_dir, tmp_path_factory):
    """A finished two-epoch run of the tiny config, trained in this process."""
    from mtl_sparse_jax import training

    workdir = str(tmp_path_factory.mktemp("good"))
    training.train_and_evaluate(_tiny(data_dir), workdir)
    return workdir


@pytest.fixture
def run_copy(good_run, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(good_run, workdir)
    return workdir


def _train_args(data_dir, workdir, *extra):
    return ["--config", TINY, f"--config.data.dir={data_dir}", f"--workdir={workdir}", *extra]


def _files(workdir):
    """{relative path: bytes} of a workdir: what 'untouched' is compared with."""
    out = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = f.read()
    return out


def _truncate_checkpoint(directory):
    """Cuts every array data file of an orbax step directory to half its size."""
    cut = 0
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            if "ocdbt" in root or name.startswith("d") or name.endswith(".data"):
                size = os.path.getsize(path)
                if size > 16:
                    with open(path, "r+b") as f:
                        f.truncate(size // 2)
                    cut += 1
    assert cut, f"no data file found under {directory}"


# ------------------------------------------------------------------------------------------- flags and configs


def test_unknown_override_key_names_the_flag_and_suggests_the_key(tmp_path):
    result = run_cli(
        "mtl_sparse_jax.main", "--config", "configs/demo.py", f"--workdir={tmp_path}", "--config.sparsity.lamda=1"
    )
    line = assert_one_line_error(result, "--config.sparsity.lamda", "lam")
    assert "did you mean" in line.lower()
    assert not os.listdir(tmp_path)


def test_missing_config_file(tmp_path):
    result = run_cli("mtl_sparse_jax.main", "--config", str(tmp_path / "nope.py"), f"--workdir={tmp_path}/w")
    assert_one_line_error(result, "nope.py")


def test_config_file_with_a_syntax_error(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n    pass\n")
    result = run_cli("mtl_sparse_jax.main", "--config", str(bad), f"--workdir={tmp_path}/w")
    assert_one_line_error(result, "bad.py", "syntax")


@pytest.mark.parametrize(
    "override, key",
    [
        ("--config.num_epochs=0", "num_epochs"),
        ("--config.num_epochs=-3", "num_epochs"),
        ("--config.steps_per_epoch=-1", "steps_per_epoch"),
        ("--config.optimizer.lr=-0.001", "optimizer.lr"),
        ("--config.sparsity.lam=-1.0", "sparsity.lam"),
        ("--config.batch_size=0", "batch_size"),
    ],
)
def test_values_out_of_range_are_refused_before_anything_is_written(data_dir, tmp_path, override, key):
    workdir = tmp_path / "w"
    result = run_cli("mtl_sparse_jax.main", *_train_args(data_dir, workdir, override))
    assert_one_line_error(result, f"'{key}'")
    assert not workdir.exists()


def test_unknown_task_and_a_task_the_data_lacks(data_dir, tmp_path):
    result = run_cli("mtl_sparse_jax.main", *_train_args(data_dir, tmp_path / "w", "--config.tasks=('seg','depht')"))
    assert_one_line_error(result, "depht")
    start = time.monotonic()
    result = run_cli("mtl_sparse_jax.main", *_train_args(data_dir, tmp_path / "w", "--config.tasks=('seg','male')"))
    assert_one_line_error(result, "male", data_dir)
    assert time.monotonic() - start < 120  # found from the manifest, not after building the model
    assert not (tmp_path / "w" / "trial_0").exists()


def test_missing_data_directory(tmp_path):
    result = run_cli("mtl_sparse_jax.main", *_train_args(tmp_path / "missing", tmp_path / "w"))
    assert_one_line_error(result, str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------------- a workdir


def test_rerun_with_another_model_is_refused_and_the_workdir_kept(data_dir, run_copy):
    before = _files(run_copy)
    result = run_cli("mtl_sparse_jax.main", *_train_args(data_dir, run_copy, "--config.model.width_multiplier=0.125"))
    line = assert_one_line_error(result, "config.json", "model.width_multiplier", "new --workdir")
    assert "0.0625" in line and "0.125" in line
    assert _files(run_copy) == before


def test_a_resumable_change_is_recorded_in_the_config_history(data_dir, run_copy):
    from mtl_sparse_jax import config_utils

    config_utils.record_workdir_config(_tiny(data_dir, num_epochs=5, **{"optimizer.lr": 1e-3}), run_copy)
    with open(os.path.join(run_copy, "config_history.jsonl")) as f:
        (entry,) = [json.loads(line) for line in f]
    assert entry["changed"] == {"num_epochs": [2, 5], "optimizer.lr": [3e-3, 1e-3]}
    assert config_utils.load(os.path.join(run_copy, "config.json")).num_epochs == 5


def test_corrupted_config_json_under_eval_and_bench(run_copy, tmp_path):
    path = os.path.join(run_copy, "config.json")
    with open(path, "w") as f:
        f.write('{"tasks": ["seg"], "model": {')
    result = run_cli("mtl_sparse_jax.main", "--mode", "eval", f"--workdir={run_copy}")
    assert_one_line_error(result, path, "not valid JSON")
    result = run_cli("mtl_sparse_jax.benchmark", "--workdir", run_copy, "--out", str(tmp_path / "bench"))
    assert_one_line_error(result, path, "not valid JSON")
    assert not (tmp_path / "bench").exists()


def test_eval_on_a_workdir_without_trained_trials(tmp_path):
    result = run_cli("mtl_sparse_jax.main", "--mode", "eval", f"--workdir={tmp_path}")
    assert_one_line_error(result, "config.json")


def test_benchmark_unknown_depth(tmp_path):
    result = run_cli("mtl_sparse_jax.benchmark", "--depth", "34", "--size", "32", "--out", str(tmp_path / "b"))
    assert_one_line_error(result, "depth", "34")


# ------------------------------------------------------------------------------------------------- checkpoints


def test_truncated_best_checkpoint_under_eval_is_one_line(run_copy):
    best = os.path.join(run_copy, "trial_0", "checkpoints", "best")
    (step,) = [d for d in os.listdir(best) if d.isdigit()]
    _truncate_checkpoint(os.path.join(best, step))
    before = _files(os.path.join(run_copy, "trial_0", "checkpoints", "latest"))
    result = run_cli("mtl_sparse_jax.main", "--mode", "eval", f"--workdir={run_copy}")
    assert_one_line_error(result, os.path.join("checkpoints", "best", step), "cannot be read")
    assert _files(os.path.join(run_copy, "trial_0", "checkpoints", "latest")) == before


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_the_previous_one_on_resume(data_dir, run_copy):
    latest = os.path.join(run_copy, "trial_0", "checkpoints", "latest")
    assert sorted(d for d in os.listdir(latest) if d.isdigit()) == ["0", "1"]  # the two newest are kept
    _truncate_checkpoint(os.path.join(latest, "1"))
    os.remove(os.path.join(run_copy, "trial_0", "test_metrics.json"))  # unfinished again: it must resume
    result = run_cli("mtl_sparse_jax.main", *_train_args(data_dir, run_copy, "--config.num_epochs=3"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cannot be read" in result.stdout and "resuming from the previous checkpoint (epoch 0)" in result.stdout
    with open(os.path.join(run_copy, "trial_0", "metrics.jsonl")) as f:
        epochs = [json.loads(line)["epoch"] for line in f]
    assert epochs == [0, 0, 1, 1, 2, 2]


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_rerun_finishes(data_dir, tmp_path):
    """The run is killed while orbax writes a checkpoint (its temporary directory exists); the rerun resumes
    from the last finished checkpoint and ends with test metrics."""
    workdir = tmp_path / "run"
    args = _train_args(data_dir, workdir, "--config.num_epochs=4")
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    env["PYTHONPATH"] = REPO
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtl_sparse_jax.main", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed_during_write = False
    deadline = time.monotonic() + 400
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            ckpt = workdir / "trial_0" / "checkpoints" / "latest"
            if ckpt.is_dir() and any("tmp" in name for name in os.listdir(ckpt)):
                proc.send_signal(signal.SIGKILL)
                killed_during_write = True
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if not killed_during_write:
        pytest.skip("the run finished before a checkpoint write could be caught")
    result = run_cli("mtl_sparse_jax.main", *args, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(workdir / "trial_0" / "test_metrics.json") as f:
        assert json.load(f)["epoch"] >= 0


@pytest.mark.slow
def test_disk_full_during_training_is_one_line(data_dir, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.decode().strip()}")
    try:
        result = run_cli("mtl_sparse_jax.main", *_train_args(data_dir, disk / "run"), timeout=600)
        assert_one_line_error(result, str(disk), "no space left on device")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
