"""The task registry: names, options, errors, declared metrics vs produced metrics, activations, extensibility."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_sparse_jax import tasks
from mtl_sparse_jax.tasks import get_task

CONTRACT_NAMES = {"seg", "depth", "normals", "edge", "male", "smile", "eyebrows", "glasses"}


def test_registry_holds_the_contract_tasks():
    assert set(tasks.task_names()) == CONTRACT_NAMES
    for name in CONTRACT_NAMES:
        task = get_task(name)
        assert task.name == name
        assert task.head == ("classification" if name in tasks.ATTRIBUTE_TASKS else "deeplab")
        assert name in task.target_keys


def test_unknown_task_is_a_one_line_error_listing_known_names():
    with pytest.raises(ValueError) as info:
        get_task("sem_seg")
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in CONTRACT_NAMES)


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="num_classes"):
        get_task("seg", num_class=40)  # misspelt option: the message lists the real ones
    with pytest.raises(ValueError, match="num_logits"):
        get_task("seg", num_classes=40, num_logits=39)
    with pytest.raises(ValueError, match="loss_resolution"):
        get_task("depth", loss_resolution="full")
    with pytest.raises(ValueError, match="double_sigmoid"):
        get_task("seg", double_sigmoid=True)


def test_segmentation_output_channels_follow_num_logits():
    assert get_task("seg", num_classes=40, num_logits=41).out_channels == 41
    assert get_task("seg", num_classes=3).out_channels == 3


@pytest.mark.parametrize("name", sorted(CONTRACT_NAMES))
def test_declared_metrics_are_exactly_the_finalized_ones(name):
    task = get_task(name)
    produced = task.finalize(task.init_stats())
    assert set(produced) == set(task.metric_names)
    assert all(m.startswith(f"{name}/") for m in produced)
    assert task.main_metric in produced and tasks.main_metric(name) == task.main_metric
    assert set(task.paper_metrics) <= set(produced) and set(task.standard_metrics) <= set(produced)
    assert set(task.higher_is_better) == set(produced)


@pytest.mark.parametrize("dataset", ["nyu", "celeba"])
def test_paper_table_columns_are_paper_metrics_of_registered_tasks(dataset):
    columns = tasks.paper_table_columns(dataset)
    for column in columns:
        assert column in get_task(column.split("/")[0]).paper_metrics
    directions = tasks.higher_is_better(columns)
    assert set(directions) == set(columns)
    with pytest.raises(ValueError, match="paper tables exist"):
        tasks.paper_table_columns("cityscapes")


def test_higher_is_better_rejects_unknown_metrics():
    with pytest.raises(ValueError, match="has no metric"):
        tasks.higher_is_better(["seg/dice"])


def test_activations():
    rng = np.random.default_rng(0)
    probs = get_task("seg", num_classes=4).activation(rng.normal(size=(2, 3, 3, 4)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-6)
    unit = get_task("normals").activation(rng.normal(size=(2, 3, 3, 3)).astype(np.float32))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(unit), axis=-1), 1.0, rtol=1e-5)
    z = rng.normal(size=(5,)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(get_task("male").activation(z)), 1 / (1 + np.exp(-z)), rtol=1e-6)


def test_task_is_a_static_jit_argument():
    """Task is frozen and hashable, so a train step can take it (or a tuple of tasks) as a static argument."""
    seen = []

    @functools.partial(jax.jit, static_argnums=2)
    def loss(raw, batch, task):
        seen.append(task.name)
        return task.loss(raw, batch)

    raw = jnp.zeros((2,), jnp.float32)
    batch = {"male": np.array([0.0, 1.0], np.float32), "smile": np.array([0.0, 1.0], np.float32)}
    first = loss(raw, batch, get_task("male"))
    loss(raw, batch, get_task("male"))  # an equal task built again: no retrace
    assert seen == ["male"]
    assert float(first) == pytest.approx(np.log(2.0), rel=1e-6)  # BCE at p = 0.5


def test_bfloat16_raw_outputs_are_scored_in_float32():
    rng = np.random.default_rng(1)
    raw = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.bfloat16)
    batch = {"normals": rng.normal(size=(2, 8, 8, 3)).astype(np.float32)}
    loss_terms = jax.jit(get_task("normals").loss_terms)
    num, den = loss_terms(raw, batch)
    assert num.dtype == jnp.float32
    want, _ = loss_terms(raw.astype(jnp.float32), batch)
    assert float(num) == pytest.approx(float(want), rel=1e-6)


def test_adding_a_task_is_one_registry_entry(monkeypatch):
    monkeypatch.setitem(tasks.TASK_BUILDERS, "young", tasks.build_attribute)
    task = get_task("young")
    assert task.head == "classification" and task.main_metric == "young/acc_paper"
    batch = {"young": np.array([1.0, 0.0], np.float32)}
    num, den = jax.jit(task.loss_terms)(jnp.asarray([0.0, 0.0]), batch)
    assert float(num / den) == pytest.approx(np.log(2.0), rel=1e-6)
