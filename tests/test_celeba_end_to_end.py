"""configs/celeba.py (seg + male + smile) end to end on a tiny fake CelebAMask-HQ release: convert, train a few
steps, evaluate and benchmark. The attribute tasks go through the same training core as the dense ones."""

import json
import os

import jax
import numpy as np
import pytest

from data_prep import celeba


@pytest.fixture(scope="module")
def celeba_data(tmp_path_factory):
    from tests import test_prep_celeba as fake

    root = str(tmp_path_factory.mktemp("celeba_raw"))
    fake.make_release(root, numbers=list(range(24)), seed=3)
    out = str(tmp_path_factory.mktemp("celeba_out"))
    celeba.convert(root, out, size=32, shard_size=8, workers=0, seed=0, log=lambda *_: None)
    return out


def _tiny_celeba_config(data_dir):
    from configs import celeba as celeba_config

    c = celeba_config.get_config()
    c.data.dir = data_dir
    c.model.depth = 18
    c.model.width_multiplier = 0.0625
    c.model.head_width_multiplier = 0.0625
    c.batch_size = 8
    c.eval_batch_size = 8
    c.num_epochs = 2
    c.steps_per_epoch = 2
    c.num_trials = 1
    c.early_stopping.patience = 0
    c.early_stopping.task_patience = 0
    c.log.progress = False
    return c


def test_celeba_config_trains_evaluates_and_benches(celeba_data, tmp_path):
    from mtl_sparse_jax import benchmark, config_utils, training

    config = _tiny_celeba_config(celeba_data)
    assert tuple(config.tasks) == ("seg", "male", "smile")
    workdir = str(tmp_path / "run")
    one = jax.devices()[:1]  # the program is what this test is about; 8 devices only compile longer
    results = training.train_and_evaluate(config, workdir, devices=one)
    test = results[0]
    for key in ("seg/iou_paper", "male/acc_paper", "smile/acc_paper", "loss/male", "loss/smile"):
        assert key in test and np.isfinite(test[key]), key
    assert 0.0 <= test["male/acc_paper"] <= 100.0 and 0.0 <= test["smile/acc_paper"] <= 100.0
    with open(os.path.join(workdir, "trial_0", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records if r["split"] == "train"] == [0, 1]
    assert all(np.isfinite(r["loss/male"]) and np.isfinite(r["loss/smile"]) for r in records)

    again = training.evaluate_workdir(config_utils.load(os.path.join(workdir, "config.json")), workdir, devices=one)
    for k, v in test.items():
        if isinstance(v, float):
            assert again[0][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k

    result = benchmark.run_from_workdir(config, workdir, batch_sizes=(2,), dtypes=("float32",), repeats=1, size=32)
    assert os.path.exists(os.path.join(workdir, "bench", "bench.json"))
    scale = max(1.0, max(result["max_abs_dense_output_per_variant"].values()))
    assert result["max_abs_diff_compact_vs_dense"] <= 1e-5 * scale
