"""Bad input and faults against every data_prep command line, run as real subprocesses on tiny fakes.

Every case checks the promise of the README: exit code 2, exactly one `error:` line on stderr that names the
file (or key) and the fix, no traceback, no TensorFlow start-up lines, and an earlier good dataset in --out
still readable, checksums and all. The fault cases kill conversions (SIGINT, SIGKILL, SIGKILL of a parent
with workers) and fill a small tmpfs.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_prep_celeba import make_release
from test_prep_nyu import _break, make_nyud_mt

from data_prep import celeba, nyu
from mtl_sparse_jax.data import spec as data_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16
NYU_SPLITS = {"train": ["a", "b", "c", "d"], "test": ["e", "f"]}
TF_LOG_LINE = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog|oneDNN|cpu_feature_guard|tensorflow", re.MULTILINE)
QUIET = lambda *_: None


def run_cli(module, *args, env=None, timeout=180):
    """`python -m module args` with the repository on the path and none of TensorFlow's log switches set, so
    that the command line has to silence TensorFlow itself."""
    environment = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    environment.update(PYTHONPATH=REPO, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def start_cli(module, *args):
    environment = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    environment.update(PYTHONPATH=REPO)
    return subprocess.Popen(
        [sys.executable, "-m", module, *map(str, args)],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        # A CI runner may start the tests with SIGINT ignored, which the child would inherit.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def assert_one_line_error(result, *fragments):
    """Exit code 2 and a single `error:` line containing every fragment; no traceback, no TensorFlow lines."""
    output = f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 2, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for fragment in fragments:
        assert fragment in lines[0], output
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, output
    assert not TF_LOG_LINE.search(result.stderr), output
    return lines[0]


def snapshot(data_dir):
    """The manifest, after checking every shard's sha256: what 'still readable' is compared with."""
    return data_spec.load_manifest(data_dir, verify="sha256")


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def nyu_good(tmp_path_factory):
    """A NYUD_MT fake and its finished conversion, done in this process."""
    src = str(tmp_path_factory.mktemp("nyu_src"))
    make_nyud_mt(src, NYU_SPLITS)
    out = str(tmp_path_factory.mktemp("nyu_out"))
    nyu.convert(src, out, size=SIZE, shard_size=2, workers=0, log=QUIET)
    return src, out


@pytest.fixture
def nyu_copy(nyu_good, tmp_path):
    """A private copy of the source and of the good dataset, and the good dataset's manifest."""
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    shutil.copytree(nyu_good[0], src)
    shutil.copytree(nyu_good[1], out)
    return src, out, snapshot(out)


@pytest.fixture(scope="module")
def celeba_good(tmp_path_factory):
    src = str(tmp_path_factory.mktemp("celeba_src"))
    make_release(src)
    out = str(tmp_path_factory.mktemp("celeba_out"))
    celeba.convert(src, out, size=8, shard_size=3, workers=0, log=QUIET)
    return src, out


def nyu_args(src, out, *extra):
    return ["--src", src, "--out", out, "--size", SIZE, "--shard-size", 2, "--workers", 0, *extra]


# ------------------------------------------------------------------------------------------------ nyu: bad input


def test_nyu_missing_src_says_the_directory_is_missing(nyu_copy, tmp_path):
    _, out, before = nyu_copy
    missing = str(tmp_path / "no_such_dir")
    line = assert_one_line_error(run_cli("data_prep.nyu", *nyu_args(missing, out)), missing, "does not exist")
    assert "--layout" not in line  # not "cannot tell the layout"
    assert snapshot(out) == before


def test_nyu_src_that_is_a_file(nyu_copy):
    src, out, before = nyu_copy
    a_file = os.path.join(src, "gt_sets", "train.txt")
    assert_one_line_error(run_cli("data_prep.nyu", *nyu_args(a_file, out)), a_file, "is not a directory")
    assert snapshot(out) == before


def test_nyu_out_that_is_a_file(nyu_copy):
    src, out, before = nyu_copy
    a_file = os.path.join(out, "manifest.json")
    assert_one_line_error(run_cli("data_prep.nyu", *nyu_args(src, a_file)), a_file, "not a directory", "--out")
    assert snapshot(out) == before


def test_nyu_missing_split_list_and_task_folder(nyu_copy):
    src, out, before = nyu_copy
    shutil.rmtree(os.path.join(src, "depth"))
    assert_one_line_error(run_cli("data_prep.nyu", *nyu_args(src, out)), os.path.join(src, "depth"), "--tasks")
    os.remove(os.path.join(src, "gt_sets", "train.txt"))
    assert_one_line_error(run_cli("data_prep.nyu", *nyu_args(src, out)), os.path.join(src, "gt_sets", "train.txt"))
    assert snapshot(out) == before


def test_nyu_duplicate_id_in_a_split_list(nyu_copy):
    src, out, before = nyu_copy
    split_list = os.path.join(src, "gt_sets", "test.txt")
    with open(split_list, "a") as f:
        f.write("e\n")
    assert_one_line_error(run_cli("data_prep.nyu", *nyu_args(src, out)), split_list, "'e' appears twice")
    assert snapshot(out) == before


def test_nyu_bad_example_in_a_reconversion_keeps_the_previous_dataset(nyu_copy):
    """The example fails after TensorFlow is up (not the split's first), in a reconversion into a good --out."""
    src, out, before = nyu_copy
    bad = _break(src, "c", "nan")
    assert_one_line_error(run_cli("data_prep.nyu", *nyu_args(src, out)), bad, "NaN")
    assert snapshot(out) == before


def test_debug_flag_and_environment_show_the_traceback(tmp_path):
    missing = str(tmp_path / "nowhere")
    for extra, env in ((["--debug"], None), ([], {"MTL_SPARSE_DEBUG": "1"})):
        result = run_cli("data_prep.nyu", "--src", missing, "--out", tmp_path / "out", *extra, env=env)
        assert result.returncode == 2
        assert "Traceback (most recent call last)" in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and missing in last


# -------------------------------------------------------------------------------- nyu: the source fingerprint


def test_another_src_into_an_existing_out_is_reconverted(nyu_good, tmp_path):
    other_src, out, clean = str(tmp_path / "other"), str(tmp_path / "out"), str(tmp_path / "clean")
    make_nyud_mt(other_src, NYU_SPLITS, seed=1)  # same ids, other pixels
    shutil.copytree(nyu_good[1], out)
    nyu.convert(other_src, out, size=SIZE, shard_size=2, workers=0, log=QUIET)
    nyu.convert(other_src, clean, size=SIZE, shard_size=2, workers=0, log=QUIET)
    assert snapshot(out)["splits"] == snapshot(clean)["splits"] != snapshot(nyu_good[1])["splits"]


def test_skip_bad_rerun_after_fixing_the_file_reconverts_it(nyu_copy, tmp_path):
    src, out, _ = nyu_copy
    depth = os.path.join(src, "depth", "c.npy")
    saved = np.load(depth)
    _break(src, "c", "nan")
    nyu.convert(src, out, size=SIZE, shard_size=2, workers=0, skip_bad=True, log=QUIET)
    assert [s["key"] for s in snapshot(out)["splits"]["train"]["skipped"]] == ["c"]
    kept = os.stat(os.path.join(out, "train-00000-of-00002.tfrecord")).st_ino
    np.save(depth, saved)  # the fix
    nyu.convert(src, out, size=SIZE, shard_size=2, workers=0, skip_bad=True, log=QUIET)
    fixed = snapshot(out)
    assert fixed["splits"]["train"]["skipped"] == [] and fixed["splits"]["train"]["num_examples"] == 4
    clean = str(tmp_path / "clean")
    nyu.convert(src, clean, size=SIZE, shard_size=2, workers=0, skip_bad=True, log=QUIET)
    assert fixed["splits"] == snapshot(clean)["splits"]
    # Only the shard that holds 'c' was rebuilt.
    assert os.stat(os.path.join(out, "train-00000-of-00002.tfrecord")).st_ino == kept


# --------------------------------------------------------------------------------------------- nyu: faults


def _children(pid):
    """Pids of the live processes whose parent is `pid` (Linux /proc)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(name))
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _staged_shards(out):
    state = os.path.join(out, ".staging", ".shard_state")
    return sorted(os.listdir(state)) if os.path.isdir(state) else []


def _many_examples_src(root, count, seed=2):
    make_nyud_mt(root, {"train": [f"t{i:03d}" for i in range(count)]}, seed=seed)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals and /proc")
def test_interrupt_and_sigkill_during_a_conversion_then_rerun_equals_a_clean_one(nyu_copy, tmp_path):
    _, out, before = nyu_copy
    src = str(tmp_path / "many")
    _many_examples_src(src, 30)
    args = ["--src", src, "--out", out, "--size", 96, "--shard-size", 1, "--workers", 0]

    # Ctrl-C: one line, and the earlier dataset is still the finished one.
    process = start_cli("data_prep.nyu", *args)
    _wait_for(lambda: _staged_shards(out), 120, "the first staged shard")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert_one_line_error(subprocess.CompletedProcess(args, process.returncode, stdout, stderr), "interrupted")
    assert snapshot(out) == before

    # SIGKILL: no chance to clean up; the earlier dataset must still be readable.
    already = len(_staged_shards(out))
    process = start_cli("data_prep.nyu", *args)
    _wait_for(lambda: len(_staged_shards(out)) > already + 1, 120, "shards staged by the second run")
    process.kill()
    process.communicate(timeout=60)
    assert snapshot(out) == before  # also proves the kill came before the commit
    staging = os.path.join(out, ".staging")
    staged = {n: os.stat(os.path.join(staging, n)).st_ino for n in os.listdir(staging) if n.endswith(".tfrecord")}

    nyu.convert(src, out, size=96, shard_size=1, workers=0, log=QUIET)  # the rerun resumes
    clean = str(tmp_path / "clean")
    nyu.convert(src, clean, size=96, shard_size=1, workers=0, log=QUIET)
    assert snapshot(out)["splits"] == snapshot(clean)["splits"]
    assert {n: os.stat(os.path.join(out, n)).st_ino for n in staged} == staged  # moved in, not rebuilt
    assert not os.path.exists(staging)
    # The shards of the earlier dataset that the new one does not list are gone.
    assert "test-00000-of-00001.tfrecord" not in os.listdir(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")
def test_workers_die_with_a_killed_parent(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    _many_examples_src(src, 60)
    args = ["--src", src, "--out", out, "--size", 96, "--shard-size", 1, "--workers", 2]
    environment = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    # Output to a file, not a pipe: orphaned workers would hold a pipe open.
    with open(tmp_path / "log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "data_prep.nyu", *map(str, args)],
            env=dict(environment, PYTHONPATH=REPO),
            stdout=log,
            stderr=log,
            cwd=REPO,
        )
    children = []
    try:
        _wait_for(lambda: len(_staged_shards(out)) >= 2, 180, "shards written by the workers")
        children = _children(process.pid)
        assert len(children) >= 2, children  # two workers (and the resource tracker)
    finally:
        process.kill()
        process.wait(timeout=60)
    deadline = time.monotonic() + 10.0
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [pid for pid in children if _alive(pid)]
    for pid in survivors:  # do not leave them running when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "worker processes outlived their parent"
    written = _staged_shards(out)
    time.sleep(1.0)
    assert _staged_shards(out) == written  # nobody writes shards any more
    assert not os.path.exists(os.path.join(out, "manifest.json"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tmpfs")
def test_disk_full_during_a_conversion_is_one_line_and_keeps_the_dataset(nyu_good, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.decode().strip()}")
    try:
        out = str(disk / "out")
        shutil.copytree(nyu_good[1], out)
        before = snapshot(out)
        big = str(tmp_path / "big")
        _many_examples_src(big, 12)
        result = run_cli("data_prep.nyu", "--src", big, "--out", out, "--size", 64, "--shard-size", 4, "--workers", 0)
        assert_one_line_error(result, os.path.join(out, ".staging"), "no space left on device", "free space")
        assert snapshot(out) == before
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ------------------------------------------------------------------------------------------------------ celeba


def test_celeba_missing_src(tmp_path):
    missing = str(tmp_path / "CelebAMask-HQ")
    result = run_cli("data_prep.celeba", "--src", missing, "--out", tmp_path / "out")
    assert_one_line_error(result, missing, "does not exist", "--src")


def test_celeba_bad_attribute_value_names_file_and_line(celeba_good, tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    shutil.copytree(celeba_good[0], src)
    shutil.copytree(celeba_good[1], out)
    before = snapshot(out)
    path = os.path.join(src, "CelebAMask-HQ-attribute-anno.txt")
    with open(path) as f:
        lines = f.read().splitlines()
    lines[4] = lines[4].replace(" 1", " 2", 1)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    result = run_cli("data_prep.celeba", "--src", src, "--out", out, "--size", 8, "--workers", 0)
    assert_one_line_error(result, f"{path}:5", "not -1 or 1")
    assert snapshot(out) == before


def test_celeba_split_json_that_is_not_json(celeba_good, tmp_path):
    split_json = str(tmp_path / "split.json")
    with open(split_json, "w") as f:
        f.write('{"train": ["0.jpg",')
    result = run_cli("data_prep.celeba", "--src", celeba_good[0], "--out", tmp_path / "out", "--split-json", split_json)
    assert_one_line_error(result, split_json, "not valid JSON")


def test_celeba_corrupt_part_mask_keeps_the_previous_dataset(celeba_good, tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    shutil.copytree(celeba_good[0], src)
    shutil.copytree(celeba_good[1], out)
    before = snapshot(out)
    victim = celeba.random_split(celeba.parse_attribute_file(os.path.join(src, celeba.ATTRIBUTE_FILE)), 0)["train"][0]
    path = celeba.part_mask_path(src, victim, "skin")
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    result = run_cli("data_prep.celeba", "--src", src, "--out", out, "--size", 8, "--shard-size", 3, "--workers", 0)
    assert_one_line_error(result, path, "cannot decode part mask")
    assert snapshot(out) == before


# --------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_out_that_is_a_file(tmp_path):
    a_file = tmp_path / "data.txt"
    a_file.write_text("not a directory\n")
    result = run_cli("data_prep.synthetic", "--out", a_file, "--num-train", 2, "--num-val", 1, "--num-test", 1)
    assert_one_line_error(result, str(a_file), "not a directory", "--out")
    assert a_file.read_text() == "not a directory\n"


def test_synthetic_bad_value_keeps_the_dataset(nyu_copy):
    _, out, before = nyu_copy
    result = run_cli("data_prep.synthetic", "--out", out, "--num-classes", 99)
    assert_one_line_error(result, "num_classes", "4..6")
    assert snapshot(out) == before


# ----------------------------------------------------------------------------------------------------- inspect


def test_inspect_missing_data_directory(tmp_path):
    missing = str(tmp_path / "data")
    result = run_cli("data_prep.inspect", "--data", missing, "--split", "train", "--index", 0, "--out", tmp_path / "x")
    assert_one_line_error(result, missing, "does not exist", "data_prep.synthetic")


def test_inspect_unknown_split_and_index(nyu_good, tmp_path):
    out = nyu_good[1]
    npz = tmp_path / "x.npz"
    result = run_cli("data_prep.inspect", "--data", out, "--split", "val", "--index", 0, "--out", npz)
    assert_one_line_error(result, os.path.join(out, "manifest.json"), "'val'", "['test', 'train']")
    result = run_cli("data_prep.inspect", "--data", out, "--split", "test", "--index", 7, "--out", npz)
    assert_one_line_error(result, "--index 7", "0..1")
    assert not npz.exists()


def test_inspect_truncated_manifest_and_shard(nyu_copy, tmp_path):
    _, out, before = nyu_copy
    npz = tmp_path / "x.npz"
    shard = os.path.join(out, before["splits"]["train"]["shards"][1]["file"])
    with open(shard, "r+b") as f:
        f.truncate(100)
    result = run_cli("data_prep.inspect", "--data", out, "--split", "train", "--index", 3, "--out", npz)
    assert_one_line_error(result, shard, "truncated", "rerun the converter")
    manifest = os.path.join(out, "manifest.json")
    with open(manifest, "r+") as f:
        f.truncate(50)
    result = run_cli("data_prep.inspect", "--data", out, "--split", "train", "--index", 0, "--out", npz)
    assert_one_line_error(result, manifest, "not readable JSON")
    assert not npz.exists()


def test_mat_layout_truncated_file(tmp_path):
    src = tmp_path / "nyu_mat"
    src.mkdir()
    mat = src / nyu.MAT_FILE_NAME
    mat.write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    result = run_cli("data_prep.nyu", "--src", src, "--out", tmp_path / "out", "--layout", "mat")
    assert_one_line_error(result, str(mat), "re-download")
