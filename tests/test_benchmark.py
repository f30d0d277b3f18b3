"""The benchmark's contracts: prox-like random sparsity patterns, timing statistics, bench.json / bench.md, the
trained-workdir path through a real orbax checkpoint, and running without TensorFlow. No timing assertions."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mtl_sparse_jax import benchmark, models

TINY = [
    "--depth",
    "18",
    "--width-multiplier",
    "0.0625",
    "--head-width-multiplier",
    "0.0625",
    "--size",
    "32",
    "--batch-sizes",
    "2",
    "--dtypes",
    "float32",
    "--repeats",
    "2",
]


def test_random_pattern_zeros_whole_input_channels():
    module = models.ResNetD(depth=50, width_multiplier=0.125)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3)), train=False))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.uniform(0.1, 1.0, s.shape).astype(np.float32), shapes["params"])
    sparse = benchmark.random_group_sparsity(params, 50, 0.6, seed=3, whole_layer_prob=0.2)
    dense_k = benchmark.backbone_conv_kernels(params, 50)
    whole = 0
    for path, k in benchmark.backbone_conv_kernels(sparse, 50).items():
        cin = k.shape[2]
        group_zero = ~(k != 0).any(axis=(0, 1, 3))
        any_zero = (k == 0).any(axis=(0, 1, 3))
        np.testing.assert_array_equal(group_zero, any_zero)  # a group is either all zero or untouched
        untouched = ~group_zero
        np.testing.assert_array_equal(k[:, :, untouched], dense_k[path][:, :, untouched])
        if group_zero.all():
            whole += 1
            assert path.split("/")[-1] in ("conv1", "conv2", "conv3"), f"{path}: stem/downsample zeroed whole"
        else:
            assert group_zero.sum() == min(round(0.6 * cin), cin - 1), path
    assert whole > 0  # with probability 0.2 over 48 block convs, some are zeroed whole
    # The input is not modified.
    assert all((k != 0).all() for k in dense_k.values())
    total = sum(k.shape[2] for k in dense_k.values())
    zero = sum(int((~(k != 0).any(axis=(0, 1, 3))).sum()) for k in benchmark.backbone_conv_kernels(sparse, 50).values())
    assert benchmark.group_sparsity(sparse, 50) == pytest.approx(zero / total)


def test_summary_statistics():
    s = benchmark.summarise([float(v) for v in (10, 1, 9, 2, 8, 3, 7, 4, 6, 5)], batch_size=4)
    assert s["latency_ms_median"] == 5.5
    assert s["latency_ms_p90"] == 9.0  # nearest rank: the 9th of 10 sorted values
    assert s["images_per_sec"] == pytest.approx(4 / 5.5e-3)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench"))
    rc = benchmark.main(["--random-sparsity", "0.6", *TINY, "--out", out])
    assert rc == 0
    with open(os.path.join(out, "bench.json")) as f:
        return json.load(f), open(os.path.join(out, "bench.md")).read()


def test_bench_json_contract(cli_run):
    result, table = cli_run
    rows = result["results"]
    seen = {(r["variant"], r["model"], r["batch_size"]) for r in rows}
    assert seen == {(v, m, 2) for v in ("backbone", "multitask") for m in ("dense", "compact")}
    for r in rows:
        for key in ("latency_ms_median", "latency_ms_p90", "images_per_sec", "flops"):
            assert r[key] is not None and r[key] > 0, key
        assert r["latency_ms_p90"] >= r["latency_ms_median"]
        assert r["images_per_sec"] == pytest.approx(r["batch_size"] / (r["latency_ms_median"] / 1e3))
    by = {(r["variant"], r["model"]): r for r in rows}
    # Fewer channels, fewer FLOPs: XLA's count and the analytic conv count agree on the direction.
    assert by[("backbone", "compact")]["flops"] < by[("backbone", "dense")]["flops"]
    assert by[("backbone", "compact")]["conv_flops"] < by[("backbone", "dense")]["conv_flops"]
    assert 0.55 <= result["group_sparsity"] <= 0.8
    scale = max(1.0, max(result["max_abs_dense_output_per_variant"].values()))
    assert result["max_abs_diff_compact_vs_dense"] <= 1e-5 * scale
    assert table.count("| backbone | float32 | 2 |") == 1 and table.count("| multitask | float32 | 2 |") == 1


def test_bad_flags_give_one_line_errors(tmp_path, capsys):
    assert benchmark.main(["--batch-sizes", "1,x", "--out", str(tmp_path)]) == 2
    assert "--batch-sizes" in capsys.readouterr().err
    assert benchmark.main(["--dtypes", "float64", "--out", str(tmp_path)]) == 2
    assert "--dtypes" in capsys.readouterr().err


def test_run_from_trained_workdir(tmp_path):
    """A real orbax 'best' checkpoint of the tiny config restores into the benchmark, which writes bench.json."""
    from mtl_sparse_jax import checkpoint as ckpt_lib
    from mtl_sparse_jax import config_utils, losses, training
    from tests import tiny_config

    config = tiny_config.get_config()
    config.data.dir = str(tmp_path / "no_data")
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    config_utils.save(config, os.path.join(workdir, "config.json"))
    tasks = training.build_tasks(config)
    model = training.build_model(config, tasks)
    variables = benchmark.random_variables(model, np.zeros((1, 32, 32, 3), np.float32))
    params = dict(variables["params"])
    params["backbone"] = benchmark.random_group_sparsity(params["backbone"], 18, 0.5, seed=1)
    loss_weights = losses.init_loss_weights(config.loss.combiner, tuple(tasks))
    ckpts = ckpt_lib.TrialCheckpoints(os.path.join(workdir, "trial_0", "checkpoints"))
    best = {"params": params, "batch_stats": variables["batch_stats"], "loss_weights": loss_weights}
    ckpts.save("best", 3, best, {"epoch": 3})
    ckpts.close()
    loaded = config_utils.load(os.path.join(workdir, "config.json"))
    result = benchmark.run_from_workdir(loaded, workdir, batch_sizes=(2,), dtypes=("float32",), repeats=1, size=32)
    assert os.path.exists(os.path.join(workdir, "bench", "bench.json"))
    assert "trial 0" in result["source"]
    assert result["group_sparsity"] > 0.4
    scale = max(1.0, max(result["max_abs_dense_output_per_variant"].values()))
    assert result["max_abs_diff_compact_vs_dense"] <= 1e-5 * scale


def test_imports_without_tensorflow():
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"
        "import mtl_sparse_jax.benchmark, mtl_sparse_jax.compaction, mtl_sparse_jax.training\n"
        "assert 'tensorflow' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
