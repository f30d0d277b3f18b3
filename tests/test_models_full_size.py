"""The paper's full-size network compiles and differentiates on a CPU: ResNetD-50 with three DeepLab heads
(40, 3 and 1 outputs) at 256×256, batch 1, one jitted train-mode forward and backward with finite gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_sparse_jax.models import HeadSpec, MultiTaskModel


@pytest.mark.slow
def test_resnetd50_three_deeplab_heads_forward_backward_at_256():
    heads = [HeadSpec("seg", "deeplab", 40), HeadSpec("normals", "deeplab", 3), HeadSpec("depth", "deeplab", 1)]
    model = MultiTaskModel(heads, depth=50)
    x = np.random.default_rng(0).uniform(size=(1, 256, 256, 3)).astype(np.float32)
    # The 'rbg' generator compiles much faster than threefry on a CPU; the init distributions are the same.
    variables = jax.jit(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False))(x)

    def loss_fn(params, batch_stats, x, rng):
        out, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats"],
        )
        return sum(jnp.mean(jnp.square(o)) for o in out.values()), (out, updates)

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, (out, updates)), grads = step(variables["params"], variables["batch_stats"], x, jax.random.key(1))

    assert {k: v.shape for k, v in out.items()} == {
        "seg": (1, 32, 32, 40),
        "normals": (1, 32, 32, 3),
        "depth": (1, 32, 32, 1),
    }
    assert np.isfinite(float(loss))
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert all(np.isfinite(np.asarray(g)).all() for _, g in leaves)
    backbone_kernels = [g for p, g in leaves if p[0].key == "backbone" and p[-1].key == "kernel"]
    assert len(backbone_kernels) == 55
    assert all(np.abs(np.asarray(g)).max() > 0 for g in backbone_kernels)  # every backbone conv gets a gradient
    assert all(np.isfinite(np.asarray(s)).all() for s in jax.tree.leaves(updates["batch_stats"]))
