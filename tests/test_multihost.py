"""Several processes on jax.distributed, as `launch.sh` starts them, on this machine's CPU (fake devices).

One tiny setting for every run (tests/tiny_config.py, lr 2e-4, 2 epochs of 2 steps, one shared data dir):

- a 1 process × 8 devices run, the reference;
- a 2 processes × 4 devices run started by hand (`--coordinator/--num-processes/--process-id`), its process 1
  killed after the first epoch: process 0 must exit non-zero within 60 s (`--heartbeat_timeout=10`);
- the same command rerun with `--local 2`: it resumes and finishes, and then
  - its per-epoch losses and test metrics equal the 1-process run's (0.5 % relative: reduction order),
  - its workdir holds exactly the 1-process run's files, each JSON-lines record once, no temporary files,
  - its checkpoints, evaluated by 1 process (`--mode eval`), give its test metrics.

Every run shares the persistent XLA cache that conftest sets, so reruns skip compilation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import subproc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch.sh")
RUN_TIMEOUT = 1200  # a guard against hangs only; these runs take a minute or two
DEATH_LIMIT_S = 60
HEARTBEAT_S = 10


def _train_args(data_dir, workdir):
    return [
        "--config",
        os.path.join(REPO, "tests", "tiny_config.py"),
        f"--config.data.dir={data_dir}",
        f"--workdir={workdir}",
        "--config.num_epochs=2",
        "--config.steps_per_epoch=2",
        "--config.optimizer.lr=2e-4",
        f"--heartbeat_timeout={HEARTBEAT_S}",
        "--shutdown_timeout=10",
    ]


def _env(devices=8):
    """1 process fakes 8 CPU devices, as the in-process tests do (conftest gives subprocesses 1 otherwise)."""
    return subproc.device_env(devices, PYTHONUNBUFFERED="1", PYTHONPATH=REPO)


def _start(launch_args, log):
    return subprocess.Popen(
        [LAUNCH, *launch_args], cwd=REPO, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True
    )


def _run(launch_args, log):
    proc = _start(launch_args, log)
    try:
        rc = proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out = open(log).read()
    assert rc == 0, f"{launch_args[:4]} exited {rc}:\n{out[-4000:]}"
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _files(root) -> list[str]:
    """Every file under `root`, relative, with the parts of a name that differ by design replaced by '*': the host
    and time in TensorBoard event files, and inside orbax checkpoints the content hashes of data files and the
    process number of the parts each process writes of a collective save."""
    out = []
    for d, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), root)
            rel = re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents.*", rel)
            if "/checkpoints/" in rel:
                rel = re.sub(r"/d/[0-9a-f]+$", "/d/*", rel)
                rel = re.sub(r"process_[0-9]+", "process_*", rel)
            out.append(rel)
    return sorted(out)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data_prep import synthetic

    d = tmp_path_factory.mktemp("multihost_data") / "synthetic"
    synthetic.generate(str(d), num_train=32, num_val=12, num_test=12, image_size=32, seed=0, num_classes=6)
    return d


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory):
    """1 process × 8 fake devices (conftest's XLA_FLAGS)."""
    root = tmp_path_factory.mktemp("one_process")
    _run(["--", *_train_args(data_dir, root / "work")], root / "log.txt")
    return root / "work"


@pytest.fixture(scope="module")
def two_processes(data_dir, tmp_path_factory):
    """2 processes × 4 fake devices: started by hand, process 1 killed in epoch 1, then rerun with --local 2."""
    root = tmp_path_factory.mktemp("two_processes")
    workdir = root / "work"
    args = _train_args(data_dir, workdir)
    port = _free_port()
    procs = []
    for i in range(2):
        procs.append(
            subprocess.Popen(
                [LAUNCH, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), "--"]
                + args,
                cwd=REPO,
                env=_env(devices=4),
                stdout=open(root / f"killed_{i}.log", "w"),
                stderr=subprocess.STDOUT,
            )
        )
    jsonl = workdir / "trial_0" / "metrics.jsonl"
    deadline = time.time() + RUN_TIMEOUT
    # metrics.jsonl gets epoch 0's two lines after its `latest` checkpoint is complete.
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    early = [p.poll() for p in procs]
    if any(rc is not None for rc in early):
        for p in procs:
            p.kill()
        logs = "\n".join((root / f"killed_{i}.log").read_text()[-3000:] for i in range(2))
        pytest.fail(f"a process ended before the kill (exit codes {early}):\n{logs}")
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    try:
        survivor_rc = procs[0].wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        survivor_rc = None
    survivor_s = time.time() - killed_at
    procs[1].wait()
    assert not (workdir / "trial_0" / "test_metrics.json").exists()

    resumed_log = _run(["--local", "2", "--devices-per-process", "4", "--", *args], root / "resumed.log")
    return {
        "workdir": workdir,
        "survivor_rc": survivor_rc,
        "survivor_s": survivor_s,
        "survivor_log": (root / "killed_0.log").read_text(),
        "resumed_log": resumed_log,
    }


@pytest.mark.slow
def test_killing_one_process_ends_the_other_and_a_rerun_resumes(two_processes):
    rc, seconds, log = two_processes["survivor_rc"], two_processes["survivor_s"], two_processes["survivor_log"]
    assert rc is not None and rc != 0, f"process 0 exited with {rc} after its peer was killed:\n{log[-3000:]}"
    assert seconds < DEATH_LIMIT_S, f"process 0 needed {seconds:.0f} s to notice its dead peer:\n{log[-3000:]}"
    assert "resumed from epoch 0" in two_processes["resumed_log"]
    assert (two_processes["workdir"] / "trial_0" / "test_metrics.json").exists()


@pytest.mark.slow
def test_two_processes_train_as_one(one_process, two_processes):
    """Same per-epoch losses (train and val, every task) and test metrics as 1 process with as many devices."""
    a = _jsonl(one_process / "trial_0" / "metrics.jsonl")
    b = _jsonl(two_processes["workdir"] / "trial_0" / "metrics.jsonl")
    assert (
        [(r["epoch"], r["split"]) for r in a]
        == [(r["epoch"], r["split"]) for r in b]
        == [
            (0, "train"),
            (0, "val"),
            (1, "train"),
            (1, "val"),
        ]
    )
    for x, y in zip(a, b):
        losses = [k for k in x if k.startswith("loss/")]
        assert len(losses) == 4  # total, seg, normals, depth
        for k in losses:
            assert y[k] == pytest.approx(x[k], rel=5e-3), (x["epoch"], x["split"], k)
    ta = json.loads((one_process / "trial_0" / "test_metrics.json").read_text())
    tb = json.loads((two_processes["workdir"] / "trial_0" / "test_metrics.json").read_text())
    assert ta.keys() == tb.keys()
    assert ta["epoch"] == tb["epoch"]
    for k, v in ta.items():
        if isinstance(v, float):
            assert tb[k] == pytest.approx(v, rel=5e-3, abs=1e-4), k


@pytest.mark.slow
def test_two_process_workdir_holds_the_files_of_a_one_process_run(one_process, two_processes):
    workdir = two_processes["workdir"]
    files, reference = _files(workdir), _files(one_process)
    # Every start of a run opens one TensorBoard file on process 0: the killed start and the resumed one.
    events = "trial_0/events.out.tfevents.*"
    assert files.count(events) == 2 and reference.count(events) == 1
    files.remove(events)
    # Outside the checkpoints: the same files, each once. Inside: the same checkpoints, steps and items, each
    # committed, of the same kinds of files (their number depends on how orbax chunks the arrays).
    assert [f for f in files if "/checkpoints/" not in f] == [f for f in reference if "/checkpoints/" not in f]
    assert sorted(set(files)) == sorted(set(reference))
    steps = {os.path.dirname(f) for f in files if f.endswith("/_CHECKPOINT_METADATA")}
    assert len(steps) == 6, steps  # latest (2 epochs), best, best_<task> for 3 tasks
    assert all(f"{s}/commit_success.txt" in files for s in steps)
    assert not [f for f in files if "tmp" in f.lower() or f.endswith("~")]
    # Appended by process 0 alone: each record once (the resumed run rewrote epoch 0's, then appended epoch 1's).
    assert len(_jsonl(workdir / "trial_0" / "metrics.jsonl")) == 4
    assert (workdir / "results.csv").read_text().count("\n") == (one_process / "results.csv").read_text().count("\n")


@pytest.mark.slow
def test_checkpoint_of_two_processes_evaluates_the_same_in_one(two_processes, tmp_path):
    copy = tmp_path / "work"
    shutil.copytree(two_processes["workdir"], copy)
    written = json.loads((copy / "trial_0" / "test_metrics.json").read_text())
    os.remove(copy / "trial_0" / "test_metrics.json")
    _run(["--", "--mode", "eval", f"--workdir={copy}"], tmp_path / "eval.log")
    again = json.loads((copy / "trial_0" / "test_metrics.json").read_text())
    assert again.keys() == written.keys()
    for k, v in written.items():
        if isinstance(v, float):
            # Same weights, same examples; only the reduction over 8 devices of 1 process differs from 2 × 4.
            assert again[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
        else:
            assert again[k] == v, k


def test_launch_rejects_a_partial_manual_layout():
    out = subprocess.run(
        [LAUNCH, "--coordinator", "127.0.0.1:1", "--", "--workdir=/nonexistent"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "go together" in out.stderr, out.stderr


def test_global_batch_of_a_step_is_the_same_for_any_process_count(data_dir):
    """Process p's batch of step s is block p of the 1-process global batch (cached splits: exact permutation)."""
    from mtl_sparse_jax.data import pipeline

    def ids(process_index, process_count, batch_size):
        batches = pipeline.iterate_batches(
            str(data_dir),
            "train",
            tasks=["seg"],
            batch_size=batch_size,
            train=True,
            seed=3,
            epoch=1,
            process_index=process_index,
            process_count=process_count,
            cache=True,
            with_ids=True,
        )
        return [list(b["id"]) for b in batches]

    one = ids(0, 1, 8)
    two = [ids(p, 2, 4) for p in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 4
    assert [a + b for a, b in zip(*two)] == one


def test_distributed_without_a_cluster_is_a_one_line_error(tmp_path):
    env = {k: v for k, v in _env().items() if not k.startswith(("SLURM_", "OMPI_"))}
    out = subprocess.run(
        [sys.executable, "-m", "mtl_sparse_jax.main", "--distributed=on", f"--workdir={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: the multi-process runtime did not start" in out.stderr and "Traceback" not in out.stderr
