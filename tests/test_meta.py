"""Meta-sparsity: the meta-gradient against float64 central differences (second order, K = 1 and 3), the
first-order formula, λ's derivative through an injected hyperparameter, episodes, config errors, and a killed
meta run that resumes to the same λ and metrics."""

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mtl_sparse_jax import config_utils
from mtl_sparse_jax.meta import core
from mtl_sparse_jax.meta import run as meta_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS, env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def float64_results():
    proc = subprocess.run(
        [sys.executable, os.path.join(TESTS, "meta_float64_check.py")],
        env=_env(JAX_ENABLE_X64="1"),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_lam_derivative_through_injected_hyperparameter(float64_results):
    """d(update)/dλ, with λ in inject_hyperparams' state, equals float64 central differences, for prox_adamw
    (adaptive prox, implicit derivative of the Newton solve) and sgd + group_lasso_prox."""
    for name, r in float64_results["injected_lam"].items():
        assert r["grad"] != 0.0, name
        assert r["rel_err"] < 1e-6, (name, r)
    assert float64_results["injected_lam"]["prox_adamw"]["zero_groups"] > 0  # the zeroed branch is exercised


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["K=1,prox_adamw", "K=3,prox_adamw", "K=3,sgd", "K=1,prox_adamw_warm", "K=3,prox_adamw_warm"]
)
def test_second_order_meta_gradient_matches_central_differences(float64_results, case):
    r = float64_results["second_order"][case]
    assert r["finite"], r  # the masked-out head's exactly-zero gradients give no NaN
    assert abs(r["grad"]) > 1e-8, r  # a real hypergradient, not the trivial zero
    assert r["rel_err"] < 1e-4, r
    assert r["dir_rel_err"] < 1e-4, r  # and the θ₀-gradient along a random direction
    assert 0 < r["zero_groups_theta_k"] < 9, r  # the prox zeroed some groups and shrank the others
    assert r["seg_head_grad_abs_sum"] == 0.0  # a task outside the subset contributes nothing


@pytest.mark.slow
def test_warm_inner_step_is_the_outer_optimizers_step(float64_results):
    """inner 'prox_adamw_warm': θ_1 is one outer-optimizer update from the state's own moments (at λ and
    meta.inner_lr), not a fresh-moment step."""
    r = float64_results["warm_step"]
    assert r["max_abs_err"] < 1e-12, r
    assert r["max_abs_diff_from_fresh"] > 1e-4, r


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3])
def test_hybrid_order_is_exact_in_rho_and_first_order_in_theta(float64_results, k):
    """order='hybrid' (inner prox_adamw_warm): dF/dρ matches central differences through the K unrolled steps;
    the θ₀-gradient is the query gradient at θ_K (FOMAML's)."""
    r = float64_results["hybrid"][f"K={k}"]
    assert abs(r["grad"]) > 1e-8 and r["rel_err"] < 1e-4, r
    assert r["theta_grad_max_abs"] > 0 and r["theta_grad_max_abs_err"] < 1e-12, r


@pytest.mark.slow
def test_first_order_gradient_is_the_explicit_penalty_term(float64_results):
    """FOMAML: dF/dρ = λ·Ω(θ_K) with the penalty in the outer loss (Ω computed in numpy), 0 without it; the
    θ₀-gradient equals the query gradient at θ_K."""
    with_pen = float64_results["first_order"]["penalty_in_outer=True"]
    without = float64_results["first_order"]["penalty_in_outer=False"]
    assert with_pen["expected"] > 0
    assert with_pen["abs_err"] <= 1e-6 * with_pen["expected"]  # group_lasso_penalty returns a float32 scalar
    assert without["grad"] == 0.0
    for r in (with_pen, without):
        assert r["theta_grad_max_abs_err"] < 1e-12


def test_task_subsets_and_draws():
    tasks = ("seg", "normals", "depth")
    assert len(core.task_subsets(tasks)) == 7
    assert core.task_subsets(tasks, 2) == [("seg", "normals"), ("seg", "depth"), ("normals", "depth"), tasks]
    a = core.draw_subsets(tasks, 1, seed=0, epoch=3, count=2000)
    assert a == core.draw_subsets(tasks, 1, seed=0, epoch=3, count=2000)  # resumable: (seed, epoch) only
    assert a != core.draw_subsets(tasks, 1, seed=0, epoch=4, count=2000)
    counts = np.array([a.count(s) for s in core.task_subsets(tasks)])
    assert counts.min() > 2000 / 7 * 0.75 and counts.max() < 2000 / 7 * 1.25  # uniform over the 7 subsets
    assert all(len(s) >= 2 for s in core.draw_subsets(tasks, 2, seed=0, epoch=0, count=200))
    mask = core.task_mask(tasks, ("depth",))
    assert [float(mask[t]) for t in tasks] == [0.0, 0.0, 1.0]


def test_zeroing_lambdas_are_the_adaptive_prox_thresholds():
    """diagnose.zeroing_lambdas: at λ just above λ*_g the adaptive prox (applied to θ with d = √ν + ε) zeroes group
    g, just below it keeps it."""
    import jax.numpy as jnp

    from mtl_sparse_jax import sparsity
    from mtl_sparse_jax.meta import diagnose

    rng = np.random.default_rng(0)
    p = rng.normal(size=(3, 3, 6, 4)) * np.linspace(0.05, 1.0, 6)[None, None, :, None]
    nu = rng.uniform(1e-6, 1e-2, size=p.shape)
    nu[:, :, 0, :] = 0.0  # a group without gradient history: d = ε there
    lr, eps = 2e-3, 1e-6
    lam_star = diagnose.zeroing_lambdas(
        {"k": p, "b": np.ones(4)}, {"k": nu, "b": np.ones(4)}, {"k": 2, "b": None}, lr, eps
    )
    assert lam_star.shape == (6,) and np.all(lam_star > 0)
    d = jnp.asarray(np.sqrt(nu) + eps, jnp.float32)
    for g, lam in enumerate(lam_star):
        for factor, zeroed in ((1.001, True), (0.999, False)):
            z = sparsity.prox_group_l2_weighted(
                jnp.asarray(p, jnp.float32), d, lr * lam * factor * np.sqrt(3 * 3 * 4), axis=2
            )
            assert bool(np.all(np.asarray(z)[:, :, g, :] == 0)) == zeroed, (g, factor)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data_prep import synthetic

    d = tmp_path_factory.mktemp("meta_data")
    synthetic.generate(str(d), num_train=32, num_val=16, num_test=16, image_size=32, seed=0, num_classes=6)
    return d


def _meta_config(data_dir, **overrides):
    import tiny_config

    c = tiny_config.get_config()
    c.data.dir = str(data_dir)
    c.loss.combiner = "sum"
    c.meta.test_tasks = ("edge",)
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("meta.inner_steps", 0, "meta.inner_steps"),
        ("meta.min_tasks", 4, "meta.min_tasks"),
        ("meta.test_tasks", ("male",), "meta.test_tasks entry 'male' is not in the data"),
        ("meta.lam_init", 0.0, "meta.lam_init"),
        ("meta.lam_init", -1e-3, "meta.lam_init"),
        ("meta.order", "third", "meta.order"),
        ("meta.query_split", "test", "meta.query_split"),
    ],
)
def test_bad_meta_config_is_a_one_line_error(data_dir, key, value, words):
    from mtl_sparse_jax.data import spec as data_spec

    config = _meta_config(data_dir, **{key: value})
    manifest = data_spec.load_manifest(str(data_dir))
    with pytest.raises(config_utils.ConfigError) as e:
        meta_run.validate_meta(config, manifest)
    assert words in str(e.value) and "\n" not in str(e.value)


def _image_keys(batch):
    return {hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest() for x in batch["image"]}


def test_held_out_train_query_is_disjoint_from_support(data_dir):
    """meta.query_split='train': query and support are disjoint parts of train that together are all of it,
    fixed by the seed; the episode batches draw each from its own part, reproducibly per (seed, epoch)."""
    from mtl_sparse_jax.data import pipeline

    config = _meta_config(data_dir, **{"meta.query_split": "train", "meta.query_fraction": 0.25})
    meta_run.validate_meta(config)
    train = list(
        pipeline.iterate_batches(
            str(data_dir), "train", tasks=config.tasks, batch_size=32, train=False, with_ids=True, depth_norm="fixed"
        )
    )
    all_ids = {i for b in train for i, w in zip(b["id"], b["weight"]) if w > 0}
    assert len(all_ids) == 32
    support, query = meta_run.held_out_train(config, seed=0)
    s_ids, q_ids = set(support["id"]), set(query["id"])
    assert len(q_ids) == len(query["id"]) == 8 and len(s_ids) == len(support["id"]) == 24
    assert not s_ids & q_ids and s_ids | q_ids == all_ids
    assert set(meta_run.held_out_train(config, seed=0)[1]["id"]) == q_ids  # deterministic: a rerun resumes
    assert set(meta_run.held_out_train(config, seed=1)[1]["id"]) != q_ids

    steps, support_batches, query_batches = meta_run.episode_sources(config, None, seed=0)
    assert steps == 24 // 8
    s_keys, q_keys = _image_keys(support), _image_keys(query)
    sup = list(itertools.islice(support_batches(0), 6))
    qry = list(itertools.islice(query_batches(0), 6))
    assert all(_image_keys(b) <= s_keys for b in sup) and all(_image_keys(b) <= q_keys for b in qry)
    assert "id" not in sup[0] and set(sup[0]) == set(support) - {"id"}
    again = next(iter(query_batches(0)))
    assert all(np.array_equal(again[k], qry[0][k]) for k in again)  # a function of (seed, epoch)
    assert not np.array_equal(next(iter(query_batches(1)))["image"], qry[0]["image"])

    bad = _meta_config(data_dir, **{"meta.query_split": "train", "meta.query_fraction": 1.0})
    with pytest.raises(config_utils.ConfigError, match="meta.query_fraction") as e:
        meta_run.validate_meta(bad)
    assert "\n" not in str(e.value)
    small = _meta_config(data_dir, **{"meta.query_split": "train", "meta.query_fraction": 0.1})
    with pytest.raises(config_utils.ConfigError, match="meta.query_fraction") as e:
        meta_run.held_out_train(small, seed=0)
    assert "\n" not in str(e.value)


def test_bad_meta_config_from_the_command_line(data_dir, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtl_sparse_jax.main",
            f"--config={os.path.join(TESTS, 'tiny_config.py')}",
            f"--workdir={tmp_path / 'w'}",
            f"--config.data.dir={data_dir}",
            "--mode=meta_train",
            "--config.meta.min_tasks=5",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "meta.min_tasks" in lines[0], proc.stderr


def _cli(workdir, data_dir, log):
    args = [
        sys.executable,
        "-m",
        "mtl_sparse_jax.main",
        f"--config={os.path.join(TESTS, 'tiny_config.py')}",
        f"--workdir={workdir}",
        f"--config.data.dir={data_dir}",
        "--mode=meta_train",
        "--config.num_epochs=3",
        "--config.steps_per_epoch=2",
        "--config.loss.combiner=sum",
        "--config.meta.lam_lr=0.2",
        "--config.meta.order=hybrid",
        "--config.meta.inner_optimizer=prox_adamw_warm",
        "--config.meta.query_split=train",
    ]
    return subprocess.Popen(args, env=_env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


@pytest.mark.slow
def test_killed_meta_run_resumes_to_the_same_lambda_and_metrics(data_dir, tmp_path):
    """Uninterrupted vs SIGKILLed after its first epoch's checkpoint and rerun: same final λ, same metrics (with
    the demo's settings: order 'hybrid', inner 'prox_adamw_warm', and the held-out train query split)."""
    full = tmp_path / "full"
    with open(tmp_path / "full.log", "w") as log:
        assert _cli(full, data_dir, log).wait(timeout=1500) == 0, (tmp_path / "full.log").read_text()

    killed = tmp_path / "killed"
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = _cli(killed, data_dir, log)
        ckpt = killed / "meta_train" / "checkpoints" / "latest"
        deadline = time.time() + 1500
        while time.time() < deadline and proc.poll() is None:
            if ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed:\n" + log_path.read_text()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (killed / "meta_train" / "summary.json").exists()
    with open(log_path, "a") as log:
        assert _cli(killed, data_dir, log).wait(timeout=1500) == 0, log_path.read_text()
    assert "resumed from epoch" in log_path.read_text()

    a = json.loads((full / "meta_train" / "summary.json").read_text())
    b = json.loads((killed / "meta_train" / "summary.json").read_text())
    assert a["lam_final"] != a["lam_init"]  # λ moved, so equality below is not trivially true
    assert b["lam_final"] == pytest.approx(a["lam_final"], rel=1e-6)
    assert b["sparsity/group"] == pytest.approx(a["sparsity/group"], abs=1e-9)
    ra = [json.loads(x) for x in (full / "meta_train" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (killed / "meta_train" / "metrics.jsonl").read_text().splitlines()]
    assert len(ra) == len(rb) == 6
    for x, y in zip(ra, rb):
        for k, v in x.items():
            if k in ("episodes_per_sec",):
                continue
            assert y[k] == (pytest.approx(v, rel=1e-5, abs=1e-7) if isinstance(v, float) else v), k
    ea = (full / "meta_train" / "meta.jsonl").read_text().splitlines()
    eb = (killed / "meta_train" / "meta.jsonl").read_text().splitlines()
    assert len(ea) == len(eb) == 6
    assert [json.loads(x)["tasks"] for x in ea] == [json.loads(x)["tasks"] for x in eb]
