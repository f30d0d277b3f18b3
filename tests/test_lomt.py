"""LOMT: heads at backbone taps on a truncated backbone, the tap points, the tap selection rule on hand-made
patterns and on a real phase-1 run, the layers file in a config, and the one-line errors for bad input."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import np_conv

from mtl_sparse_jax import config_utils, lomt
from mtl_sparse_jax.models import HeadSpec, MultiTaskModel, ResNetD, build_head, head_param_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = jax.random.PRNGKey(0)
TINY = dict(depth=18, width_multiplier=1 / 16, head_width_multiplier=1 / 16)
HEADS = (HeadSpec("seg", "deeplab", 5), HeadSpec("depth", "deeplab", 1))
# seg at a conv followed by a ReLU, depth at the last conv of a block (no ReLU): the backbone ends in layer3_1.
TAPS = (("seg", "layer2_0/conv1"), ("depth", "layer3_1/conv2"))
X = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)


def random_variables(model, x, seed=0):
    """Random params and BN statistics (mean ≠ 0, var ≠ 1, so that every BN matters) from the abstract init."""
    shapes = jax.eval_shape(lambda x: model.init(KEY, x, train=False), jax.ShapeDtypeStruct(x.shape, jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        last = path[-1].key
        if last == "var":
            return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
        if last in ("mean", "bias"):
            return rng.normal(0, 0.2, leaf.shape).astype(np.float32)
        if last == "scale":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return rng.uniform(-1, 1, leaf.shape).astype(np.float32) * np.sqrt(3.0 / fan_in)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _paths(tree, prefix=""):
    out = set()
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out |= _paths(v, f"{prefix}{k}/")
        else:
            out.add(prefix + k)
    return out


def _prefix_of(tree, like):
    """`tree` cut down to the keys of `like` (the full model's params restricted to a truncated model's)."""
    return {k: _prefix_of(tree[k], v) if hasattr(v, "items") else tree[k] for k, v in like.items()}


def expected_backbone_modules(tap_point):
    """The modules a ResNetD-18 truncated after layer3_1/conv2 must hold, written out by hand."""
    mods = {f"stem_{kind}{i}" for i in (1, 2, 3) for kind in ("conv", "bn")}
    for block in ("layer1_0", "layer1_1", "layer2_0", "layer2_1", "layer3_0"):
        mods |= {f"{block}/{m}" for m in ("conv1", "bn1", "conv2", "bn2")}
    mods |= {f"{b}/{m}" for b in ("layer1_0", "layer2_0", "layer3_0") for m in ("downsample_conv", "downsample_bn")}
    mods |= {"layer3_1/conv1", "layer3_1/bn1", "layer3_1/conv2"}
    if tap_point != "conv":
        mods.add("layer3_1/bn2")  # the tap reads after the BN, so the BN is part of the model
    return mods


@pytest.mark.parametrize("tap_point", ["conv", "bn", "relu"])
def test_lomt_heads_equal_the_heads_on_the_full_models_taps_and_truncation_changes_nothing(tap_point):
    full = MultiTaskModel(HEADS, **TINY, tap_point=tap_point)
    v = random_variables(full, X)
    lomt_model = MultiTaskModel(HEADS, **TINY, taps=TAPS, tap_point=tap_point)
    shapes = jax.eval_shape(lambda x: lomt_model.init(KEY, x, train=False), jax.ShapeDtypeStruct(X.shape, jnp.float32))
    # The truncated backbone holds exactly the layers up to the deepest tap, nothing after it.
    modules = {p.rsplit("/", 1)[0] for p in _paths(shapes["params"]["backbone"])}
    assert modules == expected_backbone_modules(tap_point)
    # Same backbone params as the full model (cut to the truncated layers); the heads have their own input widths.
    lv = random_variables(lomt_model, X, seed=2)
    for col in ("params", "batch_stats"):
        lv[col]["backbone"] = _prefix_of(v[col]["backbone"], shapes[col]["backbone"])

    # The full (untruncated) backbone's values at the taps, at the same tap point.
    backbone = ResNetD(depth=18, width_multiplier=1 / 16, tap_point=tap_point)
    bb = {"params": v["params"]["backbone"], "batch_stats": v["batch_stats"]["backbone"]}
    _, t = backbone.apply(bb, X, train=False, taps=[tap for _, tap in TAPS] + ["layer1_1", "layer3_1/conv1"])

    out = lomt_model.apply(lv, X, train=False)
    for spec, (task, tap) in zip(HEADS, TAPS):
        head = build_head(spec, TINY["head_width_multiplier"])
        key = head_param_name(task)
        want = head.apply({"params": lv["params"][key], "batch_stats": lv["batch_stats"][key]}, t[tap], train=False)
        np.testing.assert_allclose(np.asarray(out[task]), np.asarray(want), rtol=1e-5, atol=1e-5)
    # In train mode (BN on batch statistics) the truncated backbone's taps equal the full one's too.
    tap_list = [tap for _, tap in TAPS]
    (_, got), _ = lomt_model.apply(lv, X, train=True, taps=tap_list, mutable=["batch_stats"], rngs={"dropout": KEY})
    (_, want), _ = backbone.apply(bb, X, train=True, taps=tap_list, mutable=["batch_stats"])
    for tap in tap_list:
        np.testing.assert_allclose(np.asarray(got[tap]), np.asarray(want[tap]), rtol=1e-5, atol=1e-5)

    # What each tap point means, recomputed in numpy from the previous layer's value.
    p, s = v["params"]["backbone"], v["batch_stats"]["backbone"]

    def bn(y, block, name):
        r, q = s[block][name], p[block][name]
        return (y - r["mean"]) / np.sqrt(r["var"] + 1e-5) * q["scale"] + q["bias"]

    _, relu_taps = ResNetD(depth=18, width_multiplier=1 / 16).apply(
        bb, X, train=False, taps=("layer1_1", "layer3_1/conv1")
    )
    raw_seg = np_conv(np.asarray(relu_taps["layer1_1"], np.float64), p["layer2_0"]["conv1"]["kernel"], stride=2)
    raw_depth = np_conv(np.asarray(relu_taps["layer3_1/conv1"], np.float64), p["layer3_1"]["conv2"]["kernel"], 1, 2)
    want = {
        "conv": (raw_seg, raw_depth),
        "bn": (bn(raw_seg, "layer2_0", "bn1"), bn(raw_depth, "layer3_1", "bn2")),
        "relu": (np.maximum(bn(raw_seg, "layer2_0", "bn1"), 0), bn(raw_depth, "layer3_1", "bn2")),  # no ReLU there
    }[tap_point]
    np.testing.assert_allclose(np.asarray(t["layer2_0/conv1"]), want[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(t["layer3_1/conv2"]), want[1], rtol=1e-4, atol=1e-4)


def test_a_lomt_model_ending_before_the_last_block_has_fewer_xla_flops():
    from mtl_sparse_jax import benchmark

    x = jnp.asarray(X[:1])
    flops = {}
    for name, taps in (("mtl", ()), ("lomt", TAPS)):
        model = MultiTaskModel(HEADS, **TINY, taps=taps, tap_point="conv")
        v = random_variables(model, X[:1])
        flops[name] = benchmark.compile_ahead(lambda v, x, m=model: m.apply(v, x, train=False), v, x).flops
    assert flops["lomt"] < 0.9 * flops["mtl"], flops


# ----------------------------------------------------------------------------------------------------------------
# Selection rule on hand-made patterns


CONVS = [f"c{i}" for i in range(6)]
TOTALS = np.array([100, 100, 100, 100, 200, 200])


def _choose(counts, agg="all", threshold=0.01):
    flags = lomt.active_flags(np.array(counts), TOTALS, threshold)
    return lomt.select_index(lomt.aggregate(flags, agg))


def test_threshold_is_strictly_more_than_the_fraction_of_input_channels():
    # 1 % of 100 is 1 channel: 1 is not more than 1 %, 2 is; of 200 channels 2 is not, 3 is.
    flags = lomt.active_flags(np.array([[1, 2, 0, 5, 2, 3]]), TOTALS, 0.01)
    assert flags.tolist() == [[False, True, False, True, False, True]]


def test_the_tap_is_the_last_active_conv_and_later_convs_are_all_inactive():
    assert _choose([[50, 40, 30, 0, 0, 0]]) == 2
    assert _choose([[50, 0, 30, 2, 0, 0]]) == 3  # an inactive conv inside the active part does not end it
    assert _choose([[5, 5, 5, 5, 5, 5]]) == 5  # all active: the last conv (no truncation)
    assert _choose([[0, 0, 0, 0, 0, 0]]) is None  # all inactive: no tap


def test_disagreeing_trials_under_all_and_majority_and_ties():
    trials = [[9, 9, 9, 9, 0, 0], [9, 9, 0, 0, 0, 0], [9, 9, 9, 0, 0, 0]]
    assert _choose(trials, "all") == 1  # active in every trial: c0, c1
    assert _choose(trials, "majority") == 2  # c2 in 2 of 3 trials, c3 in 1 of 3
    tie = [[9, 9, 9, 9, 0, 0], [9, 9, 0, 0, 0, 0]]
    assert _choose(tie, "majority") == 1  # 1 of 2 trials is a tie, which is not a majority
    assert _choose(tie, "all") == 1
    with pytest.raises(lomt.LomtError, match="--agg"):
        lomt.aggregate(np.ones((2, 3), bool), "mean")


# ----------------------------------------------------------------------------------------------------------------
# A real phase-1 run, the layers file and the config


@pytest.fixture(scope="module")
def phase1(tmp_path_factory):
    """Two trials of a sparse single-task (seg) run of the tiny config: a phase-1 directory of one task."""
    import tiny_config

    from data_prep import synthetic
    from mtl_sparse_jax import training

    root = tmp_path_factory.mktemp("lomt")
    data = root / "data"
    synthetic.generate(str(data), num_train=16, num_val=8, num_test=8, image_size=32, seed=0, num_classes=6)
    c = tiny_config.with_overrides(
        data, tasks=("seg",), num_trials=2, num_epochs=1, steps_per_epoch=3, **{"sparsity.lam": 0.01}
    )
    run = root / "phase1" / "seg__lam0.01"
    training.train_and_evaluate(c, str(run), devices=jax.devices()[:1])  # one device compiles ~3x faster
    return root, c


def test_selection_counts_equal_a_recount_of_the_restored_kernels(phase1):
    import orbax.checkpoint as ocp

    root, _ = phase1
    result = lomt.select(str(root / "phase1"))
    entry = result["tasks"]["seg"]
    assert len(entry["trials"]) == 2 and result["convs"][0] == "layer1_0/conv1" and len(result["convs"]) == 16
    for trial, counts in zip(entry["trials"], entry["active_inputs"]):
        best = os.path.join(trial, "checkpoints", "best")
        step = max(int(d) for d in os.listdir(best) if d.isdigit())
        restored = ocp.StandardCheckpointer().restore(os.path.join(best, str(step), "state"))
        recount = []
        for name in result["convs"]:
            block, conv = name.split("/")
            k = np.asarray(restored["params"]["backbone"][block][conv]["kernel"])
            recount.append(sum(1 for i in range(k.shape[2]) if np.abs(k[:, :, i, :]).sum() > 0))
        assert counts == recount
    assert any(c < t for c, t in zip(entry["active_inputs"][0], result["input_channels"]))  # λ zeroed channels
    flags = np.array(entry["active_inputs"]) > 0.01 * np.array(result["input_channels"])
    assert entry["tap"] == result["convs"][int(np.flatnonzero(flags.all(0))[-1])]
    # The tap's channels and resolution: a basic block's conv of planes P has P/16 channels here; 32 px / 8.
    planes = {"1": 64, "2": 128, "3": 256, "4": 512}[entry["tap"][5]]
    assert entry["channels"] == max(1, int(planes / 16 + 0.5))
    assert entry["resolution"] == ([8, 8] if entry["tap"].startswith("layer1") else [4, 4])


def test_select_command_writes_the_layers_file_and_plot_and_a_config_reads_it(phase1):
    root, c = phase1
    out = root / "phase1" / "lomt_layers.json"
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "mtl_sparse_jax.lomt", "select", "--phase1", str(root / "phase1"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["agg"] == "all" and data["threshold"] == 0.01 and "rule" in data
    assert (root / "phase1" / "lomt_pattern_seg.png").stat().st_size > 0
    c2 = config_utils.load(str(root / "phase1" / "seg__lam0.01" / "config.json"))
    c2.lomt.layers_file = str(out)
    config_utils.validate(c2)
    tap = data["tasks"]["seg"]["tap"]
    assert lomt.model_taps(c2) == (("seg", tap),)
    # Phase 2 trains as any run; its backbone params end with the tap's block.
    from mtl_sparse_jax import training

    c2.num_trials, c2.num_epochs, c2.steps_per_epoch = 1, 1, 2
    (result,) = training.train_and_evaluate(c2, str(root / "phase2"), devices=jax.devices()[:1])
    assert np.isfinite(result["seg/miou"])
    backbone = lomt.restore_backbone(str(root / "phase2" / "trial_0"), c2)
    from mtl_sparse_jax.models import block_names

    blocks = block_names(18)
    kept = blocks[: blocks.index(tap.split("/")[0]) + 1]
    assert sorted(k for k in backbone if k.startswith("layer")) == sorted(kept)


def test_taps_and_tap_point_are_part_of_the_step_spec(tmp_path):
    import tiny_config

    from mtl_sparse_jax import training

    def spec(**overrides):
        return training.step_spec(tiny_config.with_overrides(tmp_path, **overrides), devices=jax.devices()[:1])

    taps = "seg=layer2_0/conv1,normals=layer2_0/conv1,depth=layer3_0/conv2"
    a, b = spec(**{"model.taps": taps}), spec(**{"model.taps": taps, "model.tap_point": "bn"})
    assert a != b and a.model.taps == (
        ("seg", "layer2_0/conv1"),
        ("normals", "layer2_0/conv1"),
        ("depth", "layer3_0/conv2"),
    )
    assert a != spec() and a == spec(**{"model.taps": taps})
    kept = a.model.backbone_conv_paths()  # the per-layer statistics list the kept convs only
    assert kept[-1] == "layer3_0/conv2" and "layer3_0/downsample_conv" not in kept and "layer2_1/conv2" in kept


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    import tiny_config

    c = tiny_config.with_overrides(tmp_path, tasks=("seg", "depth"))
    c.model.taps = "seg=layer3_1/cnv1"
    with pytest.raises(config_utils.ConfigError, match="did you mean 'layer3_1/conv1'"):
        config_utils.validate(c)
    c.model.taps = ""
    layers = tmp_path / "layers.json"
    layers.write_text(json.dumps({"depth": 18, "tasks": {"seg": {"tap": "layer2_0/conv1"}}}))
    c.lomt.layers_file = str(layers)
    with pytest.raises(config_utils.ConfigError, match=r"not for \['depth'\]") as e:
        config_utils.validate(c)
    assert str(layers) in str(e.value) and "\n" not in str(e.value)
    from mtl_sparse_jax import compaction

    with pytest.raises(compaction.CompactionError, match="not supported"):
        compaction.compact({}, {}, MultiTaskModel(HEADS, **TINY, taps=TAPS), input_size=(32, 32))
    empty = tmp_path / "phase1"
    (empty / "seg__lam0.01" / "trial_0").mkdir(parents=True)
    assert lomt.main(["select", "--phase1", str(empty), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no finished single-task trial" in err and "\n" not in err
