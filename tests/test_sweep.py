"""Sweeps end to end on a tiny sweep (tests/tiny_config.py on 32×32 synthetic shards, 4 cells, 2 trials, 2 epochs
of 2 steps): the CLI runs every cell, a rerun trains nothing, a run killed mid-cell resumes to the same summary,
the report's numbers equal a plain recomputation from the cells' test_metrics.json, the SLURM script maps array
indices to cells, and bad input stops before anything is written."""

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import subproc

from mtl_sparse_jax import sweep as cli
from mtl_sparse_jax.experiments import sweep as sweep_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")

TINY_SWEEP = """
import sys
sys.path.insert(0, {tests!r})
import tiny_config
from mtl_sparse_jax.experiments.sweep import grid, union


def get_sweep():
    c = tiny_config.get_config()
    c.data.dir = {data!r}
    c.data.generate_if_missing = True  # the first sweep run generates it, as the demo sweep does from a fresh clone
    c.data.synthetic_size = 32
    c.data.synthetic_num_train = 24
    c.data.synthetic_num_val = 11
    c.data.synthetic_num_test = 13
    c.tasks = ("seg", "depth")
    c.num_epochs = 2
    c.steps_per_epoch = 2
    c.num_trials = 2
    c.sparsity.lam = 0.0
    singles = grid(tasks=[("seg",), ("depth",)])
    multi = grid(tasks=[("seg", "depth")], **{{"sparsity.lam": [0.0, 0.05]}})
    return c, union(singles, multi)
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Where the tiny sweep's synthetic data goes; the sweep generates it on first use (`completed`)."""
    return tmp_path_factory.mktemp("synthetic") / "data"


@pytest.fixture(scope="module")
def sweep_file(data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("sweeps") / "tiny.py"
    path.write_text(TINY_SWEEP.format(tests=TESTS, data=str(data_dir)))
    return path


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    # One CPU device in the CLI runs (the in-process tests fake 8): less to compile and run on a small machine.
    env["XLA_FLAGS"] = subproc.device_env(1)["XLA_FLAGS"]
    return env


def _cli(args, log=None):
    cmd = [sys.executable, "-m", "mtl_sparse_jax.sweep", *map(str, args)]
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True)


def _run(args, timeout=1800):
    proc = _cli(args)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"sweep {args} did not finish in {timeout} s:\n{out}")
    return proc.returncode, out


CELLS = ["seg__lam0__group", "depth__lam0__group", "seg+depth__lam0__group", "seg+depth__lam0.05__group"]


@pytest.fixture(scope="module")
def completed(sweep_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sweep_run")
    rc, out = _run(["--sweep", sweep_file, "--workdir", workdir, "--bench-repeats", "2"])
    assert rc == 0, out
    assert "generating the synthetic demo dataset" in out
    return workdir, out


def _checkpoint_mtimes(workdir):
    out = {}
    for root, _, files in os.walk(workdir):
        if "checkpoints" in root.split(os.sep):
            for f in files:
                p = os.path.join(root, f)
                out[p] = os.stat(p).st_mtime_ns
    return out


def test_names_are_stable_readable_and_filesystem_safe():
    from configs import default

    c = default.get_config()
    c.tasks = ("seg", "depth")
    c.sparsity.lam = 1e-5
    assert sweep_lib.cell_name(c, {"tasks": ("seg", "depth"), "sparsity.lam": 1e-5}) == "seg+depth__lam1e-05__group"
    c.sparsity.prox = "none"
    c.optimizer.lr = 3e-4
    name = sweep_lib.cell_name(c, {"optimizer.lr": 3e-4, "data.dir": "a b/c"})
    assert name == "seg+depth__lam1e-05__noprox__data.dir=a-b-c__optimizer.lr=0.0003"
    assert "/" not in name and " " not in name


def test_grid_product_and_union():
    g = sweep_lib.grid(tasks=[("seg",), ("depth",)], **{"sparsity.lam": [0.0, 1e-5]})
    assert g == [
        {"tasks": ("seg",), "sparsity.lam": 0.0},
        {"tasks": ("seg",), "sparsity.lam": 1e-5},
        {"tasks": ("depth",), "sparsity.lam": 0.0},
        {"tasks": ("depth",), "sparsity.lam": 1e-5},
    ]
    p = sweep_lib.product([{"a": 1}, {"a": 2}], [{"b": 3}])
    assert p == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    assert sweep_lib.union(g[:2], g[1:3]) == g[:3]


@pytest.mark.slow
def test_sweep_runs_every_cell_and_writes_the_report(completed):
    workdir, out = completed
    state = json.loads((workdir / "sweep.json").read_text())
    assert [c["name"] for c in state["cells"]] == CELLS
    assert all(c["state"] == "done" and c["trials_done"] == 2 for c in state["cells"])
    assert state["cells"][3]["overrides"] == {"tasks": ["seg", "depth"], "sparsity.lam": 0.05}
    for name in CELLS:
        for k in (0, 1):
            assert (workdir / name / f"trial_{k}" / "test_metrics.json").exists()
        assert (workdir / name / "results.md").exists()  # the same outputs as `main`
    for f in ("table.md", "table.csv", "metrics.md", "metrics.csv"):
        assert (workdir / "tables" / f).stat().st_size > 0
    figures = {p.name for p in (workdir / "figures").iterdir()}
    expected = {"lambda_metrics.png", "lambda_sparsity.png", "sparsity_profile.png", "lambda_latency.png"}
    assert expected | {"layers_seg+depth__lam0.05__group.png"} <= figures
    # Fig. 3's counts: every conv's active channels <= its total, and the λ > 0 cell removed some.
    layers = json.loads((workdir / "figures" / "layers_seg+depth__lam0.05__group.json").read_text())
    (counts,) = layers.values()
    assert all(0 <= a <= t for _, a, t in counts)
    summary = json.loads((workdir / "summary.json").read_text())
    group = summary["cells"][3]["metrics"]["sparsity/group"]["mean"]
    total = sum(t for _, _, t in counts)
    assert group > 0
    # The best checkpoint of trial 0 is what the figure counts; its sparsity is that trial's test sparsity.
    trial0 = json.loads((workdir / CELLS[3] / "trial_0" / "test_metrics.json").read_text())
    assert 100.0 * (total - sum(a for _, a, _ in counts)) / total == pytest.approx(trial0["sparsity/group"])
    bench = json.loads((workdir / CELLS[3] / "bench" / "bench.json").read_text())
    assert {r["model"] for r in bench["results"]} == {"dense", "compact"}


@pytest.mark.slow
def test_rerun_trains_nothing(completed, sweep_file):
    workdir, _ = completed
    before = _checkpoint_mtimes(workdir)
    assert before
    summary_before = (workdir / "summary.json").read_text()
    rc, out = _run(["--sweep", sweep_file, "--workdir", workdir, "--no-bench"])
    assert rc == 0, out
    assert _checkpoint_mtimes(workdir) == before
    assert out.count("skipped") == len(CELLS), out
    assert "starting" not in out and "resuming" not in out
    assert (workdir / "summary.json").read_text() == summary_before
    rc, out = _run(["--sweep", sweep_file, "--workdir", workdir, "--dry-run"])
    assert rc == 0 and out.count(" done ") == len(CELLS), out


def _assert_same_summary(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same_summary(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_summary(x, y, f"{path}/{i}")
    elif isinstance(a, float):
        # Same command, same devices: equal up to XLA's reduction order across process restarts.
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7), path
    else:
        assert a == b, path


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_summary(completed, sweep_file, tmp_path):
    """SIGKILL the sweep right after the first checkpoint of its first cell, rerun: same summary.json."""
    reference, _ = completed
    workdir = tmp_path / "killed"
    log = tmp_path / "killed.log"
    proc = _cli(["--sweep", sweep_file, "--workdir", workdir, "--no-bench"], log=log)
    latest = workdir / CELLS[0] / "trial_0" / "checkpoints" / "latest"
    deadline = time.time() + 1800
    while time.time() < deadline and proc.poll() is None:
        if latest.is_dir() and any(p.name.isdigit() for p in latest.iterdir()):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep ended before it could be killed:\n" + log.read_text()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / "summary.json").exists()
    rc, out = _run(["--sweep", sweep_file, "--workdir", workdir, "--dry-run"])
    assert re.search(rf"^\s*0\s+{re.escape(CELLS[0])}\s+partial\s", out, re.M), out

    rc, out = _run(["--sweep", sweep_file, "--workdir", workdir, "--no-bench"])
    assert rc == 0, out
    assert "resuming" in out and "resumed from epoch" in out, out
    a = json.loads((workdir / "summary.json").read_text())
    b = json.loads((reference / "summary.json").read_text())
    _assert_same_summary(a, b)


def _plain_mean_std(values):
    x = np.asarray(values, np.float64)
    return float(x.mean()), float(np.sqrt(((x - x.mean()) ** 2).mean()))


@pytest.mark.slow
def test_table_numbers_and_delta_m_recomputed_from_test_metrics(completed):
    workdir, _ = completed
    trials = {
        name: [json.loads((workdir / name / f"trial_{k}" / "test_metrics.json").read_text()) for k in (0, 1)]
        for name in CELLS
    }
    with open(workdir / "tables" / "table.csv") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    summary = {c["name"]: c for c in json.loads((workdir / "summary.json").read_text())["cells"]}
    for name in CELLS:
        for col in ("seg/iou_paper", "depth/mae_paper", "sparsity/group", "sparsity/param"):
            if col.split("/")[0] in ("seg", "depth") and col.split("/")[0] not in name:
                assert rows[name][f"{col}_mean"] == ""
                continue
            mean, std = _plain_mean_std([t[col] for t in trials[name]])
            assert float(rows[name][f"{col}_mean"]) == pytest.approx(mean, rel=1e-12, abs=1e-12)
            assert float(rows[name][f"{col}_std"]) == pytest.approx(std, rel=1e-9, abs=1e-12)
            assert summary[name]["metrics"][col]["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-12)
    assert any(float(rows[n]["seg/iou_paper_std"]) > 0 for n in CELLS if "seg" in n)  # two trials really differ

    def m(name, col):
        return float(np.mean([t[col] for t in trials[name]]))

    for name in CELLS[2:]:
        seg = (m(name, "seg/iou_paper") - m(CELLS[0], "seg/iou_paper")) / m(CELLS[0], "seg/iou_paper")
        depth = -(m(name, "depth/mae_paper") - m(CELLS[1], "depth/mae_paper")) / m(CELLS[1], "depth/mae_paper")
        assert float(rows[name]["delta_m_mean"]) == pytest.approx(100.0 * (seg + depth) / 2, rel=1e-9, abs=1e-9)
    assert rows[CELLS[0]]["delta_m_mean"] == "" and rows[CELLS[1]]["delta_m_mean"] == ""  # the baselines

    # Best / second best per column: IoU higher is better, MAE lower is better.
    for col, higher in (("seg/iou_paper", True), ("depth/mae_paper", False)):
        vals = {n: float(r[f"{col}_mean"]) for n, r in rows.items() if r[f"{col}_mean"]}
        ordered = sorted(set(vals.values()), reverse=higher)
        for n, v in vals.items():
            want = "best" if v == ordered[0] else "second" if v == ordered[1] else ""
            assert rows[n][f"{col}_mark"] == want, (col, n)
    md = (workdir / "tables" / "table.md").read_text()
    assert md.count("**") >= 2 and "<u>" in md


@pytest.mark.slow
def test_slurm_array_index_runs_its_cell(sweep_file, completed, tmp_path):
    workdir = tmp_path / "slurm_run"
    rc, out = _run(
        ["--sweep", sweep_file, "--workdir", workdir, "--emit", "slurm", "--partition", "gpu", "--gpus-per-task", "1"]
        + ["--time", "02:00:00", "--override.optimizer.weight_decay=0.0002"]
    )
    assert rc == 0, out
    script = workdir / "sweep.sbatch"
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "#SBATCH --array=0,1,2,3\n" in text and "#SBATCH --partition=gpu\n" in text
    assert "#SBATCH --gpus-per-task=1\n" in text and "#SBATCH --time=02:00:00\n" in text
    assert not any((workdir / n).exists() for n in CELLS)
    # Run array task 2 the way SLURM would: the script with SLURM_ARRAY_TASK_ID set.
    env = {**_env(), "SLURM_ARRAY_TASK_ID": "2"}
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout + res.stderr
    assert [n for n in CELLS if (workdir / n).exists()] == [CELLS[2]]
    assert (workdir / CELLS[2] / "trial_1" / "test_metrics.json").exists()
    config = json.loads((workdir / CELLS[2] / "config.json").read_text())
    assert config["tasks"] == ["seg", "depth"] and config["optimizer"]["weight_decay"] == 0.0002
    state = json.loads((workdir / "sweep.json").read_text())
    assert [c["state"] for c in state["cells"]] == ["new", "new", "done", "new"]


def _bad(tmp_path, args, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_input_gives_one_line_and_writes_nothing(sweep_file, tmp_path, capsys):
    workdir = tmp_path / "never"
    base = TINY_SWEEP.format(tests=TESTS, data=str(tmp_path))

    unknown = tmp_path / "unknown.py"
    unknown.write_text(base.replace("return c, union(singles, multi)", "return c, [{}, {'sparsity.lamb': 1.0}]"))
    err = _bad(tmp_path, ["--sweep", unknown, "--workdir", workdir], capsys)
    assert "unknown.py" in err and "cell 1" in err and "'sparsity.lamb'" in err and "sparsity.lam" in err

    no_fn = tmp_path / "no_fn.py"
    no_fn.write_text("CELLS = []\n")
    err = _bad(tmp_path, ["--sweep", no_fn, "--workdir", workdir], capsys)
    assert "no_fn.py" in err and "get_sweep" in err

    dup = tmp_path / "dup.py"
    dup.write_text(base.replace("return c, union(singles, multi)", "return c, [{'seed': 0}, {}, {'seed': 0}]"))
    err = _bad(tmp_path, ["--sweep", dup, "--workdir", workdir], capsys)
    assert "dup.py" in err and "cells 0 and 2" in err and "seg+depth__lam0__group__seed=0" in err

    err = _bad(tmp_path, ["--sweep", sweep_file, "--workdir", workdir, "--cell", 4], capsys)
    assert "--cell 4" in err and "4 cells" in err

    err = _bad(tmp_path, ["--sweep", sweep_file, "--workdir", workdir, "--override.optimizer.lrr=1"], capsys)
    assert "--override.optimizer.lrr" in err and "optimizer.lr" in err

    err = _bad(tmp_path, ["--sweep", sweep_file, "--workdir", workdir, "--only", "nothing*"], capsys)
    assert "nothing*" in err
    assert not workdir.exists()


@pytest.mark.slow
def test_failing_cell_is_recorded_and_the_sweep_goes_on(sweep_file, data_dir, tmp_path, capsys):
    failing = tmp_path / "failing.py"
    text = TINY_SWEEP.format(tests=TESTS, data=str(data_dir))
    text = text.replace(
        "return c, union(singles, multi)",
        "return c, [{'data.dir': " + repr(str(tmp_path / "missing")) + ", 'data.generate_if_missing': False, "
        "'tasks': ('seg',)}, {'tasks': ('seg',)}]",
    )
    failing.write_text(text)
    workdir = tmp_path / "w"
    rc = cli.main(["--sweep", str(failing), "--workdir", str(workdir), "--no-bench", "--override.num_trials=1"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "1 cell(s) failed: [0]" in captured.err
    state = json.loads((workdir / "sweep.json").read_text())
    assert [c["state"] for c in state["cells"]] == ["failed", "done"]
    assert "missing" in state["cells"][0]["error"]
    summary = json.loads((workdir / "summary.json").read_text())
    assert [c["trials_done"] for c in summary["cells"]] == [0, 1]
    assert "not run" in (workdir / "tables" / "table.md").read_text()


def test_incomplete_cell_is_marked_not_ranked():
    from mtl_sparse_jax.experiments import tables

    def cell(name, tasks, lam, done, iou):
        metrics = {"seg/iou_paper": {"mean": iou, "std": 0.0, "n": done}} if done else {}
        common = {"name": name, "tasks": tasks, "lam": lam, "prox": "adaptive", "overrides": {}, "num_trials": 2}
        return {**common, "trials_done": done, "complete": done == 2, "metrics": metrics}

    summary = {
        "sweep_file": "s.py",
        "dataset": "synthetic",
        "cells": [cell("a", ["seg"], 0.0, 2, 0.5), cell("b", ["seg"], 1e-5, 1, 0.9), cell("c", ["seg"], 1e-4, 2, 0.4)],
    }
    table = tables.build_table(summary, ["seg/iou_paper"], with_delta=True)
    md = tables.table_markdown(table, "t")
    assert "1/2 incomplete" in md
    assert table["marks"][(0, "seg/iou_paper")] == "best" and (1, "seg/iou_paper") not in table["marks"]
    assert math.isclose(table["rows"][2]["values"]["delta_m"], 100.0 * (0.4 - 0.5) / 0.5)
