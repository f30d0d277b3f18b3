"""benchmarks/gpu_suite.sh --smoke end to end in a subprocess where neither TensorFlow nor ml-collections imports,
as on the GPU machine: every section runs and the JSON and markdown agree with each other."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Blocks the two packages the GPU image lacks, then runs the suite as `python benchmarks/gpu_suite.py` would.
SHIM = r"""
import runpy, sys
sys.modules["tensorflow"] = None
sys.modules["ml_collections"] = None
sys.argv = ["gpu_suite.py"] + sys.argv[1:]
runpy.run_path("benchmarks/gpu_suite.py", run_name="__main__")
"""


@pytest.mark.slow
def test_smoke_run_writes_every_section_without_tensorflow_or_ml_collections(tmp_path):
    out = tmp_path / "suite"
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", SHIM, "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.load(open(out / "gpu_suite.json"))
    md = (out / "gpu_suite.md").read_text()
    assert result["mode"] == "smoke"

    loaders = {r["loader"]: r for r in result["loaders"]}
    assert loaders["tfdata"] == {"loader": "tfdata", "skipped": "TensorFlow is not installed"}
    device = loaders["device"]
    assert device["images_per_sec"] > 0 and len(device["epoch_seconds"]) == 3

    train = result["train"]
    assert [(r["dtype"], r["batch_size"]) for r in train] == [("float32", 2)]
    row = train[0]
    assert row["ms_per_step"] > 0 and row["flops_per_step"] > 0 and row["mfu"] is None  # no peak known on a CPU
    assert abs(row["images_per_sec"] - 2 / (row["ms_per_step"] / 1e3)) < 1e-6 * row["images_per_sec"]
    prox = result["prox"]
    assert prox["prox_ms"] == pytest.approx(prox["update_ms_adaptive"] - prox["update_ms_none"])
    assert row["prox_share"] == pytest.approx(prox["prox_ms"] / row["ms_per_step"])

    inference = result["inference"]
    assert 55.0 < inference["group_sparsity_percent"] < 65.0  # 60 % of each conv's input channels zeroed
    assert inference["conv_flops_per_image"]["compact"] < inference["conv_flops_per_image"]["dense"]
    rows = inference["rows"]
    assert {(r["variant"], r["batch_size"]) for r in rows} == {
        (v, b) for v in ("backbone", "multitask") for b in (1, 2)
    }
    assert all(r["dense_ms"] > 0 and r["compact_ms"] > 0 for r in rows)

    trial = result["trial"]
    eval_rate = next(r for r in rows if r["variant"] == "multitask" and r["batch_size"] == 2)["dense_images_per_sec"]
    assert trial["eval_images_per_sec"] == eval_rate and trial["train_images_per_sec"] == row["images_per_sec"]
    assert trial["epoch_s"] == pytest.approx(795 / row["images_per_sec"] + 654 / eval_rate)
    assert trial["hours"] == pytest.approx(1000 * trial["epoch_s"] / 3600)

    for heading in ("## Train step", "## Loaders", "## Inference", "## Full NYU trial"):
        assert heading in md
    assert f"| float32 | 2 | {row['ms_per_step']:.1f} |" in md
    assert "| tfdata | | TensorFlow is not installed | |" in md
    assert md.count("| backbone | float32 |") == 2 and md.count("| multitask | float32 |") == 2
