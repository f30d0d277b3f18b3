"""The optax transformations against the published step math, independent solvers and data-parallel runs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtl_sparse_jax import sparsity


def _weighted_group_prox_np(x, d, tau):
    """float64 adaptive group prox of one group by bisection on Σ x²/(θ + τ/d)² = 1 (see test_sparsity_prox)."""
    if np.linalg.norm(d * x) <= tau:
        return np.zeros_like(x)
    c = tau / d
    lo, hi = 0.0, np.linalg.norm(x)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.sum(x * x / (mid + c) ** 2) > 1.0 else (lo, mid)
    theta = 0.5 * (lo + hi)
    return x * theta / (theta + c)


def _per_group_np(fn, x, axis, *others):
    """Apply fn(group, *other_groups) -> group to every slice along axis of float64 arrays."""
    out = np.empty_like(x)
    for c in range(x.shape[axis]):
        idx = (slice(None),) * axis + (c,)
        out[idx] = fn(x[idx].ravel(), *(o[idx].ravel() for o in others)).reshape(x[idx].shape)
    return out


def _prox_adamw_np(params, grads_seq, *, lr, lam, axes, b1=0.9, b2=0.999, eps=1e-6, wd=0.0, prox="adaptive"):
    """The issue's step math, written out in float64 numpy (flat dict of leaves -> group axis or None)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, grads in enumerate(grads_seq, start=1):
        for k in p:
            g = np.asarray(grads[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            d = np.sqrt(v[k]) + eps
            alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            p[k] = p[k] - alpha * m[k] / d
            p[k] = p[k] - lr * wd * p[k]
            if axes[k] is not None and prox != "none":
                n_g = p[k].size // p[k].shape[axes[k]]
                tau = lr * lam * math.sqrt(n_g)
                if prox == "adaptive":
                    p[k] = _per_group_np(lambda x, dd: _weighted_group_prox_np(x, dd, tau), p[k], axes[k], d)
                elif prox == "euclidean":
                    p[k] = _per_group_np(
                        lambda x: max(0.0, 1 - tau / max(np.linalg.norm(x), 1e-300)) * x, p[k], axes[k]
                    )
                else:  # l1, Adam-weighted
                    p[k] = np.sign(p[k]) * np.maximum(np.abs(p[k]) - lr * lam / d, 0)
    return p


def _small_problem(seed=0, steps=4):
    rng = np.random.default_rng(seed)
    channel_scale = np.logspace(-2, 0, 6)[None, None, :, None]  # groups of different sizes
    params = {
        "conv": (rng.normal(size=(3, 3, 6, 4)) * channel_scale).astype(np.float32),
        "dense": rng.normal(size=(4, 3)).astype(np.float32),
    }
    grads_seq = [
        {
            k: (rng.normal(size=v.shape) * 10 ** rng.uniform(-3, 0, size=v.shape)).astype(np.float32)
            for k, v in params.items()
        }
        for _ in range(steps)
    ]
    return params, grads_seq, {"conv": 2, "dense": None}


def _run(tx, params, grads_seq):
    update = jax.jit(tx.update)
    state = tx.init(params)
    for g in grads_seq:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("prox", ["adaptive", "euclidean", "l1"])
def test_prox_adamw_follows_the_published_step_math(prox):
    params, grads_seq, axes = _small_problem()
    lam = {"adaptive": 0.03, "euclidean": 2.0, "l1": 1e-3}[prox]
    kw = dict(lr=1e-2, lam=lam, b1=0.9, b2=0.999, eps=1e-6, wd=0.1)
    ref = _prox_adamw_np(params, grads_seq, axes=axes, prox=prox, **kw)
    tx = sparsity.prox_adamw(kw["lr"], lam, axes, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.1, prox=prox)
    out, state = _run(tx, params, grads_seq)
    for k in params:
        np.testing.assert_allclose(out[k], ref[k], rtol=2e-5, atol=1e-7)
    zero_groups = np.all(ref["conv"] == 0, axis=(0, 1, 3))
    if prox != "l1":
        assert 0 < zero_groups.sum() < 6  # the test exercises both branches
        np.testing.assert_array_equal(np.all(np.asarray(out["conv"]) == 0, axis=(0, 1, 3)), zero_groups)
    else:
        assert 0 < np.sum(ref["conv"] == 0) < ref["conv"].size
    assert int(state.count) == len(grads_seq)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves((state.mu, state.nu)))


def test_lam_zero_is_plain_hf_adamw_bit_for_bit():
    params, grads_seq, axes = _small_problem(seed=1)
    dense, _ = _run(sparsity.prox_adamw(1e-2, 0.0, axes, weight_decay=0.1, prox="none"), params, grads_seq)
    for mode in ("adaptive", "euclidean"):
        sparse, _ = _run(sparsity.prox_adamw(1e-2, 0.0, axes, weight_decay=0.1, prox=mode), params, grads_seq)
        for k in params:
            np.testing.assert_array_equal(sparse[k], dense[k])
    ref = _prox_adamw_np(params, grads_seq, lr=1e-2, lam=0.0, axes=axes, wd=0.1, prox="none")
    for k in params:
        np.testing.assert_allclose(dense[k], ref[k], rtol=1e-6, atol=1e-8)


def test_inject_hyperparams_changes_lam_and_lr_without_recompiling():
    params, grads_seq, axes = _small_problem(seed=2)
    # β1, β2 static: as injected float32 hyperparameters, 1 − float32(0.999) would be 1.3e-5 off.
    tx = optax.inject_hyperparams(sparsity.prox_adamw, static_args=("group_axes", "b1", "b2"))(
        learning_rate=1e-2, lam=1e-4, group_axes=axes, weight_decay=0.1
    )
    traces = []

    @jax.jit
    def step(params, state, grads):
        traces.append(1)
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state

    state = tx.init(params)
    p_small, _ = step(params, state, grads_seq[0])
    state.hyperparams["lam"] = jnp.full_like(state.hyperparams["lam"], 1.0)
    p_big, _ = step(params, state, grads_seq[0])
    state.hyperparams["learning_rate"] = jnp.full_like(state.hyperparams["learning_rate"], 1e-3)
    p_lr, _ = step(params, state, grads_seq[0])
    assert len(traces) == 1
    zeros = lambda p: int(np.sum(np.all(np.asarray(p["conv"]) == 0, axis=(0, 1, 3))))
    assert zeros(p_small) == 0 and zeros(p_big) == 6
    for lam, lr, out in [(1e-4, 1e-2, p_small), (1.0, 1e-3, p_lr)]:
        ref = _prox_adamw_np(params, grads_seq[:1], lr=lr, lam=lam, axes=axes, wd=0.1)
        np.testing.assert_allclose(out["conv"], ref["conv"], rtol=2e-5, atol=1e-7)


def test_prox_adamw_update_is_differentiable_in_lam():
    # Meta-sparsity learns λ through the update: d(loss of the updated params)/dλ must exist and be right.
    params, grads_seq, axes = _small_problem(seed=8, steps=1)
    target = jax.tree_util.tree_map(np.ones_like, params)

    def after_update(lam):
        tx = sparsity.prox_adamw(1e-2, lam, axes)
        u, _ = tx.update(grads_seq[0], tx.init(params), params)
        new = optax.apply_updates(params, u)
        return sum(
            jnp.sum(jnp.square(a - b))
            for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(target))
        )

    lam = 0.01
    grad = jax.jit(jax.grad(after_update))(lam)

    def loss_np(lam):
        p = _prox_adamw_np(params, grads_seq, lr=1e-2, lam=lam, axes=axes)
        return sum(np.sum((p[k] - 1.0) ** 2) for k in p)

    fd = (loss_np(lam * (1 + 1e-4)) - loss_np(lam * (1 - 1e-4))) / (2e-4 * lam)
    assert abs(fd) > 1e-3
    np.testing.assert_allclose(grad, fd, rtol=2e-3)


def test_schedules_are_evaluated_at_the_step_count_and_group_axes_may_be_callable():
    params, grads_seq, axes = _small_problem(seed=3, steps=3)
    lr_sched = lambda count: 1e-2 / (1.0 + count)
    lam_sched = lambda count: 1e-3 * (1.0 + count)
    out, _ = _run(sparsity.prox_adamw(lr_sched, lam_sched, lambda p: {"conv": 2, "dense": None}), params, grads_seq)
    # Independent: the float64 step math with lr_t, λ_t, one step at a time from the same moments.
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads_seq, start=1):
        lr, lam = lr_sched(t - 1), lam_sched(t - 1)
        for k in p:
            m[k] = 0.9 * m[k] + 0.1 * g[k]
            v[k] = 0.999 * v[k] + 0.001 * np.asarray(g[k], np.float64) ** 2
            d = np.sqrt(v[k]) + 1e-6
            p[k] = p[k] - lr * math.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m[k] / d
        tau = lr * lam * math.sqrt(36)
        p["conv"] = _per_group_np(
            lambda x, dd: _weighted_group_prox_np(x, dd, tau), p["conv"], 2, np.sqrt(v["conv"]) + 1e-6
        )
    for k in p:
        np.testing.assert_allclose(out[k], p[k], rtol=2e-5, atol=1e-8)


def test_group_lasso_prox_rewrites_updates_of_grouped_leaves_only():
    params, grads_seq, axes = _small_problem(seed=4, steps=1)
    g = grads_seq[0]
    lr, lam = 0.1, 0.5
    for mode in ("group", "l1"):
        tx = optax.chain(optax.sgd(lr), sparsity.group_lasso_prox(lr, lam, axes, mode=mode))
        u, _ = jax.jit(tx.update)(g, tx.init(params), params)
        new = optax.apply_updates(params, u)
        y = np.asarray(params["conv"], np.float64) - lr * g["conv"]
        if mode == "group":
            tau = lr * lam * 6.0  # √n_g = √(3·3·4)
            expected = _per_group_np(lambda x: max(0.0, 1 - tau / np.linalg.norm(x)) * x, y, 2)
            assert np.sum(np.all(expected == 0, axis=(0, 1, 3))) == 2
        else:
            expected = np.sign(y) * np.maximum(np.abs(y) - lr * lam, 0)
        np.testing.assert_allclose(new["conv"], expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(u["dense"], -lr * g["dense"])


def test_bf16_params_get_bf16_updates_and_float32_moments():
    params, grads_seq, axes = _small_problem(seed=5)
    p16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    g16 = [jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), g) for g in grads_seq]
    tx = sparsity.prox_adamw(1e-2, 3e-3, axes)
    out16, state = _run(tx, p16, g16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(out16))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves((state.mu, state.nu)))
    out32, _ = _run(
        tx,
        jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), p16),
        [jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), g) for g in g16],
    )
    for k in params:
        np.testing.assert_allclose(np.asarray(out16[k], np.float32), out32[k], rtol=2e-2, atol=2e-3)


def test_bad_inputs_raise_clear_errors():
    params, grads_seq, axes = _small_problem(seed=6, steps=1)
    tx = sparsity.prox_adamw(1e-2, 1e-3, axes)
    with pytest.raises(ValueError, match="needs the params"):
        tx.update(grads_seq[0], tx.init(params))
    with pytest.raises(ValueError, match="structure of the params"):
        sparsity.prox_adamw(1e-2, 1e-3, {"conv": 2}).init(params)
    with pytest.raises(ValueError, match="prox must be one of"):
        sparsity.prox_adamw(1e-2, 1e-3, axes, prox="group")
    with pytest.raises(ValueError, match="mode must be one of"):
        sparsity.group_lasso_prox(1e-2, 1e-3, axes, mode="adaptive")


# ---------------------------------------------------------------------------------------------------------------
# Convergence on a convex group-lasso least-squares problem.
#
# What is proven (derived in prox_adamw's docstring): a fixed point θ̄ of prox_adamw (wd = 0, moments converged so
# m = g = ∇f(θ̄) and d = √v + ε fixed, t → ∞ so α_t → lr) satisfies θ̄ = prox^D_{lr·λR}(θ̄ − lr·D⁻¹g), i.e.
# 0 ∈ D(θ̄ − θ̄ + lr D⁻¹ g) + lr λ ∂R(θ̄) = lr (g + λ ∂R(θ̄)): the optimality condition of f + λR, for ANY positive
# diagonal D. Both the Adam step and the prox use the same D and the same base lr, so D cancels. (With the
# Euclidean prox after Adam it does not cancel: the fixed points solve 0 ∈ D⁻¹g + λ∂R instead.) Convergence itself
# is not proven for Adam; the test shows it on a problem where every coordinate's gradient stays away from 0
# at the solution (true for group lasso: g_g = −λ√n θ_g/‖θ_g‖ on active groups, ‖g_g‖ ≤ λ√n on zero ones), so d
# stays bounded below and the iteration behaves like a fixed-metric proximal gradient method.
# The ISTA chain (optax.sgd then group_lasso_prox) is proximal gradient descent with step lr ≤ 1/L.
# ---------------------------------------------------------------------------------------------------------------

C_IN, C_OUT, N_OBS = 6, 4, 64


def _lasso_problem():
    rng = np.random.default_rng(1)
    theta_true = rng.normal(size=(1, 1, C_IN, C_OUT))
    theta_true[:, :, 3:, :] = 0
    A = rng.normal(size=(N_OBS, C_IN * C_OUT)) / np.sqrt(N_OBS)
    b = A @ theta_true.ravel() + 0.3 * rng.normal(size=N_OBS)
    return A, b


def _fista_np(A, b, prox, iters=20000):
    """float64 FISTA on ½‖Aθ − b‖² + penalty, with the penalty's prox(v, step) given in closed form."""
    L = np.linalg.eigvalsh(A.T @ A).max()
    x = np.zeros(A.shape[1])
    y, t = x.copy(), 1.0
    for _ in range(iters):
        x_new = prox(y - A.T @ (A @ y - b) / L, 1.0 / L)
        t_new = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
        y = x_new + (t - 1) / t_new * (x_new - x)
        x, t = x_new, t_new
    return x.reshape(1, 1, C_IN, C_OUT), L


def _block_soft(v, thr):
    g = v.reshape(C_IN, C_OUT)  # ravel order of (1, 1, C_IN, C_OUT): rows are input-channel groups
    nrm = np.linalg.norm(g, axis=1, keepdims=True)
    return (np.maximum(0, 1 - thr / np.maximum(nrm, 1e-300)) * g).ravel()


def _optimize(tx, A, b, steps):
    Aj, bj = jnp.asarray(A, jnp.float32), jnp.asarray(b, jnp.float32)
    loss = lambda p: 0.5 * jnp.sum(jnp.square(Aj @ p["k"].ravel() - bj))

    @jax.jit
    def go(params):
        def body(_, carry):
            p, s = carry
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, u), s

        return jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))[0]

    return np.asarray(go({"k": jnp.zeros((1, 1, C_IN, C_OUT), jnp.float32)})["k"])


def test_group_lasso_solvers_converge_to_independent_solution():
    A, b = _lasso_problem()
    lam = 0.3
    sqrt_n = math.sqrt(C_OUT)
    sol, L = _fista_np(A, b, lambda v, s: _block_soft(v, s * lam * sqrt_n))
    group_norms = np.linalg.norm(sol.reshape(C_IN, C_OUT), axis=1)
    assert np.sum(group_norms == 0) == 3 and np.all(group_norms[group_norms > 0] > 0.1)  # not degenerate
    axes = {"k": 2}

    ista = _optimize(optax.chain(optax.sgd(1.0 / L), sparsity.group_lasso_prox(1.0 / L, lam, axes)), A, b, 2000)
    np.testing.assert_allclose(ista, sol, atol=1e-5)
    # The reference's hyperparameters (β2 = 0.999, ε = 1e-6) and a faster-forgetting β2.
    for lr, b2, steps in [(1e-2, 0.99, 5000), (3e-3, 0.999, 20000)]:
        theta = _optimize(sparsity.prox_adamw(lr, lam, axes, b2=b2), A, b, steps)
        np.testing.assert_allclose(theta, sol, atol=1e-5)
        np.testing.assert_array_equal(np.all(theta == 0, axis=(0, 1, 3)), group_norms == 0)


def test_l1_chain_converges_to_independent_lasso_solution():
    A, b = _lasso_problem()
    lam = 0.1
    sol, L = _fista_np(A, b, lambda v, s: np.sign(v) * np.maximum(np.abs(v) - s * lam, 0))
    assert 0 < np.sum(sol == 0) < sol.size
    theta = _optimize(
        optax.chain(optax.sgd(1.0 / L), sparsity.group_lasso_prox(1.0 / L, lam, {"k": 2}, mode="l1")), A, b, 2000
    )
    np.testing.assert_allclose(theta, sol, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Data parallelism: jit over a Mesh of 8 (fake CPU) devices, batch sharded, params and state replicated.
# ---------------------------------------------------------------------------------------------------------------


def test_eight_device_data_parallel_update_equals_one_device():
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set in conftest.py)")
    rng = np.random.default_rng(7)
    channel_scale = 0.3 * np.logspace(-1, 0, 4)[:, None]
    params = {
        "backbone": {"conv": {"kernel": (rng.normal(size=(3, 3, 4, 8)) * channel_scale).astype(np.float32)}},
        "head": {"kernel": (rng.normal(size=(8, 2)) * 0.3).astype(np.float32)},
    }
    batch = {"x": rng.normal(size=(32, 6, 6, 4)).astype(np.float32), "y": rng.normal(size=(32, 2)).astype(np.float32)}
    axes = sparsity.default_group_axes(params)
    tx = sparsity.prox_adamw(0.05, 5e-4, axes, weight_decay=0.1)

    def loss(p, batch):
        h = jax.lax.conv_general_dilated(
            batch["x"], p["backbone"]["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        out = jnp.mean(jax.nn.relu(h), axis=(1, 2)) @ p["head"]["kernel"]
        return jnp.mean(jnp.square(out - batch["y"]))

    def train(params, state, batch):
        for _ in range(3):
            u, state = tx.update(jax.grad(loss)(params, batch), state, params)
            params = optax.apply_updates(params, u)
        return params, state

    single = jax.jit(train)(params, tx.init(params), batch)[0]

    mesh = Mesh(np.array(devices[:8]), ("data",))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    p_rep = jax.device_put(params, replicated)
    s_rep = jax.device_put(tx.init(params), replicated)
    b_shard = jax.device_put(batch, sharded)
    parallel = jax.jit(train, in_shardings=(replicated, replicated, sharded), out_shardings=(replicated, replicated))(
        p_rep, s_rep, b_shard
    )[0]
    assert len(parallel["backbone"]["conv"]["kernel"].sharding.device_set) == 8

    zero = lambda p: np.all(np.asarray(p["backbone"]["conv"]["kernel"]) == 0, axis=(0, 1, 3))
    assert 0 < zero(single).sum() < 4  # the prox acted, and not on everything
    np.testing.assert_array_equal(zero(parallel), zero(single))
    for a, b in zip(jax.tree_util.tree_leaves(parallel), jax.tree_util.tree_leaves(single)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
