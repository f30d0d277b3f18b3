"""The proximal operators against mathematics: KKT conditions, brute-force minimisation, closed forms, thresholds.

References here are independent float64 numpy computations (bisection on the scalar optimality equation,
accelerated proximal gradient on the prox objective, 1-D grid searches), never the code under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_sparse_jax import sparsity


def _weighted_prox_bisection(x, d, tau):
    """float64 minimiser of ½ Σ d (z − x)² + τ‖z‖ for one group: zero test, then bisection on θ = ‖z‖.

    KKT: d_i (z_i − x_i) + τ z_i/‖z‖ = 0  ⇒  z_i = x_i θ/(θ + τ/d_i) with Σ x_i²/(θ + τ/d_i)² = 1, whose left side
    decreases in θ; the root lies in [0, ‖x‖].
    """
    x, d = np.asarray(x, np.float64).ravel(), np.asarray(d, np.float64).ravel()
    if np.linalg.norm(d * x) <= tau:
        return np.zeros_like(x)
    c = tau / d
    lo, hi = 0.0, np.linalg.norm(x)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.sum(x * x / (mid + c) ** 2) > 1.0:
            lo = mid
        else:
            hi = mid
    theta = 0.5 * (lo + hi)
    return x * theta / (theta + c)


def _weighted_prox_fista(x, d, tau, iters=3000):
    """float64 FISTA on f(z) = ½ Σ d (z − x)² (L = max d) with the plain block soft-threshold prox of τ‖z‖.

    Vectorised over problems: rows of x, d are independent groups, ``tau`` has one entry per row.
    """
    x, d = np.asarray(x, np.float64), np.asarray(d, np.float64)
    L = d.max(axis=1, keepdims=True)
    step_tau = np.asarray(tau, np.float64)[:, None] / L
    z = np.zeros_like(x)
    y, t = z.copy(), 1.0
    for _ in range(iters):
        v = y - d * (y - x) / L
        nv = np.linalg.norm(v, axis=1, keepdims=True)
        z_new = np.maximum(0.0, 1.0 - step_tau / np.maximum(nv, 1e-300)) * v
        t_new = 0.5 * (1 + np.sqrt(1 + 4 * t * t))
        y = z_new + (t - 1) / t_new * (z_new - z)
        z, t = z_new, t_new
    return z


def _objective(z, x, d, tau):
    return 0.5 * np.sum(d * (z - x) ** 2) + tau * np.linalg.norm(z)


def _random_weighted_problem(rng, n, num_groups, log_d_range=(-6, -1)):
    """Groups along axis 1 of an [n, C] array; d spans Adam-like magnitudes; τ near the median zero threshold."""
    x = rng.normal(size=(n, num_groups)) * 10 ** rng.uniform(-3, 1)
    d = 10 ** rng.uniform(*log_d_range, size=(n, num_groups))
    tau = float(np.median(np.linalg.norm(d * x, axis=0)) * rng.uniform(0.3, 1.5))
    return x.astype(np.float32), d.astype(np.float32), tau


def _conditioning(x, d, tau):
    """‖d⊙x‖/(‖d⊙x‖ − τ): how much the float32 rounding of ‖d⊙x‖ is amplified in a surviving group."""
    dn = np.linalg.norm(np.asarray(d, np.float64) * np.asarray(x, np.float64))
    return dn / (dn - tau)


def test_weighted_prox_satisfies_kkt_on_random_inputs():
    rng = np.random.default_rng(0)
    # 60 random problems of varying size, zero-padded to one shape so that one compiled function serves all
    # (a zero-padded element has z = 0 and leaves the group's problem unchanged).
    num, n_max, c_max = 60, 40, 5
    xs = np.zeros((num, n_max, c_max), np.float32)
    ds = np.ones((num, n_max, c_max), np.float32)
    taus = np.zeros(num, np.float32)
    for k in range(num):
        n, c = int(rng.integers(1, n_max + 1)), int(rng.integers(1, c_max + 1))
        xs[k, :n, :c], ds[k, :n, :c], taus[k] = _random_weighted_problem(rng, n, c)
    prox = jax.jit(jax.vmap(lambda x, d, t: sparsity.prox_group_l2_weighted(x, d, t, axis=1)))
    zs = np.asarray(prox(xs, ds, taus), np.float64)
    checked_kept = checked_zero = 0
    for k in range(num):
        tau = float(taus[k])
        for g in range(c_max):
            x, d, z = xs[k, :, g].astype(np.float64), ds[k, :, g].astype(np.float64), zs[k, :, g]
            if not np.any(x):
                continue
            dx_norm = np.linalg.norm(d * x)
            if not np.any(z):
                # 0 ∈ ∂: d⊙x must lie in the τ-ball (allowing float32 rounding of the norm).
                assert dx_norm <= tau * (1 + 1e-6)
                checked_zero += 1
                continue
            assert dx_norm > tau * (1 - 1e-6)
            theta = np.linalg.norm(z)
            residual = d * (z - x) + tau * z / theta
            scale = d * np.abs(x) + tau * np.abs(z) / theta
            tol = 1e-5 + 8 * np.finfo(np.float32).eps * _conditioning(x, d, tau)
            assert np.all(np.abs(residual) <= tol * scale), (residual, scale)
            # z is x shrunk coordinatewise: same signs, smaller magnitudes.
            assert np.all(z * x >= 0) and np.all(np.abs(z) <= np.abs(x) * (1 + 1e-6))
            checked_kept += 1
    assert checked_kept > 20 and checked_zero > 20


def test_weighted_prox_matches_float64_bisection_with_extreme_adam_denominators():
    rng = np.random.default_rng(1)
    x, d, _ = _random_weighted_problem(rng, 2304, 64, log_d_range=(-6, -1))  # a layer3 3×3 conv group size
    x *= (10 ** rng.uniform(-1, 1, size=64)).astype(np.float32)
    tau = float(np.median(np.linalg.norm(d.astype(np.float64) * x, axis=0)))
    z, iters = sparsity.prox_group_l2_weighted(x, d, tau, axis=1, return_iterations=True)
    assert int(iters) < 100  # converged inside the budget, not cut off by it
    z = np.asarray(z)
    kept = 0
    for g in range(x.shape[1]):
        ref = _weighted_prox_bisection(x[:, g], d[:, g], tau)
        # float32 limit: rounding of ‖d⊙x‖ amplified by the group's conditioning.
        tol = 1e-6 + 4 * np.finfo(np.float32).eps * (_conditioning(x[:, g], d[:, g], tau) if np.any(ref) else 0)
        assert np.linalg.norm(z[:, g] - ref) <= tol * max(np.linalg.norm(ref), 1e-30)
        kept += bool(np.any(ref))
    assert 5 < kept < 60


def test_weighted_prox_agrees_with_brute_force_minimisation_on_small_groups():
    rng = np.random.default_rng(2)
    num, n = 40, 4
    sizes = rng.integers(2, n + 1, size=num)
    x = rng.normal(size=(num, n)) * (np.arange(n) < sizes[:, None])  # groups of 2–4 elements, zero-padded
    d = rng.uniform(0.05, 1.0, size=(num, n))
    x, d = x.astype(np.float32), d.astype(np.float32)
    tau = (rng.uniform(0.1, 1.2, size=num) * np.linalg.norm(d.astype(np.float64) * x, axis=1)).astype(np.float32)
    prox = jax.jit(jax.vmap(lambda x, d, t: sparsity.prox_group_l2_weighted(x[:, None], d[:, None], t, axis=1)[:, 0]))
    z = np.asarray(prox(x, d, tau), np.float64)
    z_bf = _weighted_prox_fista(x, d, tau)
    np.testing.assert_allclose(z, z_bf, atol=2e-6)
    assert 5 < np.sum(np.any(z_bf != 0, axis=1)) < num - 5
    # No point near it does better either.
    for k in range(num):
        f = _objective(z[k], x[k], d[k], tau[k])
        assert f <= _objective(z_bf[k], x[k], d[k], tau[k]) + 1e-6
        for _ in range(10):
            assert f <= _objective(z[k] + 1e-3 * rng.normal(size=n), x[k], d[k], tau[k]) + 1e-7


def test_weighted_prox_with_constant_d_equals_euclidean_prox_with_scaled_tau():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 3, 16, 8)).astype(np.float32)
    norms = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=(0, 1, 3)))
    for c in (1e-6, 1e-3, 1.0, 7.5):
        # argmin ½c‖z − x‖² + τ‖z‖ = argmin ½‖z − x‖² + (τ/c)‖z‖
        tau = float(c * np.median(norms))
        z_w = sparsity.prox_group_l2_weighted(x, np.full_like(x, c), tau, axis=2)
        z_e = sparsity.prox_group_l2(x, tau / c, axis=2)
        np.testing.assert_allclose(z_w, z_e, rtol=1e-5, atol=1e-6)
        zero_groups = np.all(np.asarray(z_e) == 0, axis=(0, 1, 3))
        assert 0 < zero_groups.sum() < 16
        np.testing.assert_array_equal(np.all(np.asarray(z_w) == 0, axis=(0, 1, 3)), zero_groups)


def test_euclidean_prox_is_block_soft_thresholding():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 7, 3)).astype(np.float32)
    tau = 2.5
    z = np.asarray(sparsity.prox_group_l2(x, tau, axis=1))
    for c in range(7):
        g = x[:, c, :].astype(np.float64)
        nrm = np.linalg.norm(g)
        np.testing.assert_allclose(z[:, c, :], max(0.0, 1 - tau / nrm) * g, rtol=1e-6, atol=1e-7)
    # Per-group thresholds (a vector along the group axis).
    taus = np.linspace(0.0, 6.0, 7).astype(np.float32)
    z = np.asarray(sparsity.prox_group_l2(x, taus, axis=1))
    for c in range(7):
        g = x[:, c, :].astype(np.float64)
        np.testing.assert_allclose(z[:, c, :], max(0.0, 1 - taus[c] / np.linalg.norm(g)) * g, rtol=1e-6, atol=1e-7)


def test_threshold_boundaries_are_exact():
    # Exactly representable: ‖(3, 4)‖ = 5; with d = 2, ‖d⊙x‖ = 10. A group is zero iff the norm is ≤ τ.
    x = np.array([[3.0], [4.0]], np.float32)
    d = np.full_like(x, 2.0)
    assert not np.any(sparsity.prox_group_l2(x, 5.0, axis=1))
    assert not np.any(sparsity.prox_group_l2_weighted(x, d, 10.0, axis=1))
    assert not np.any(sparsity.prox_group_l2_weighted(x, d, 10.0001, axis=1))
    # Just above the threshold the group survives with a small, correct norm.
    # Here ‖x‖ and ‖d⊙x‖ are exact in float32, so the only rounding is in τ itself and the result must be
    # accurate relative to the (tiny) surviving norm, not merely relative to τ.
    for rel in (1e-3, 1e-5):
        tau = float(np.float32(10.0 * (1 - rel)))
        z = np.asarray(sparsity.prox_group_l2_weighted(x, d, tau, axis=1))[:, 0]
        np.testing.assert_allclose(z, _weighted_prox_bisection(x, d, tau), rtol=1e-5, atol=0)
        assert np.linalg.norm(z) > 0
        tau = float(np.float32(5.0 * (1 - rel)))
        z_e = np.asarray(sparsity.prox_group_l2(x, tau, axis=1))[:, 0]
        np.testing.assert_allclose(z_e, (5.0 - tau) / 5.0 * x[:, 0], rtol=1e-6, atol=0)
    # τ = 0 is the identity, bit for bit.
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    d = (10 ** rng.uniform(-6, -1, size=x.shape)).astype(np.float32)
    np.testing.assert_array_equal(sparsity.prox_group_l2_weighted(x, d, 0.0, axis=2), x)
    np.testing.assert_array_equal(sparsity.prox_group_l2(x, 0.0, axis=2), x)


def test_weighted_prox_gradients_match_finite_differences_of_the_exact_minimiser():
    # The Newton loop is not differentiated: θ(x, d, τ) gets its derivative from the implicit function theorem.
    # Reference: central differences of the float64 bisection solution.
    rng = np.random.default_rng(12)
    x = rng.normal(size=(6, 5))
    d = 10 ** rng.uniform(-3, -1, size=(6, 5))
    tau = 0.03  # groups 1 (‖d⊙x‖ ≈ 0.014) is zeroed, the others survive with margin
    w = rng.normal(size=(6, 5))

    def objective_np(x, d, tau):
        z = np.stack([_weighted_prox_bisection(x[:, g], d[:, g], tau) for g in range(5)], axis=1)
        return np.sum(z * w)

    objective = jax.jit(lambda x, d, t: jnp.sum(sparsity.prox_group_l2_weighted(x, d, t, axis=1) * w))
    args = [np.asarray(a, np.float32) for a in (x, d)] + [np.float32(tau)]
    gx, gd, gt = jax.grad(objective, argnums=(0, 1, 2))(*args)
    h = 1e-6
    np.testing.assert_allclose(gt, (objective_np(x, d, tau + h) - objective_np(x, d, tau - h)) / (2 * h), rtol=1e-3)
    for i, j in [(2, 2), (0, 3), (3, 4), (5, 0), (1, 1)]:
        e = np.zeros_like(x)
        e[i, j] = 1e-6
        fd_x = (objective_np(x + e, d, tau) - objective_np(x - e, d, tau)) / 2e-6
        e[i, j] = 1e-6 * d[i, j]
        fd_d = (objective_np(x, d + e, tau) - objective_np(x, d - e, tau)) / (2e-6 * d[i, j])
        np.testing.assert_allclose(gx[i, j], fd_x, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(gd[i, j], fd_d, rtol=1e-3, atol=1e-4)
    assert not np.any(gx[:, 1]) and np.any(gx[:, 0])


def test_kernel_with_every_group_under_threshold_is_zeroed_whole():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(3, 3, 8, 16)).astype(np.float32)
    d = (10 ** rng.uniform(-6, -3, size=x.shape)).astype(np.float32)
    dx_norms = np.sqrt(np.sum((d.astype(np.float64) * x) ** 2, axis=(0, 1, 3)))
    z = np.asarray(sparsity.prox_group_l2_weighted(x, d, float(dx_norms.max()) * 1.001, axis=2))
    assert z.shape == x.shape and not np.any(z)
    # Raise one group above the threshold: exactly that input channel survives.
    x[:, :, 5, :] *= 10.0
    z = np.asarray(sparsity.prox_group_l2_weighted(x, d, float(dx_norms.max()) * 1.001, axis=2))
    alive = np.any(z != 0, axis=(0, 1, 3))
    np.testing.assert_array_equal(alive, np.arange(8) == 5)


def test_single_element_groups_reduce_to_weighted_soft_thresholding():
    # n_g = 1: ½d(z − x)² + τ|z| has the closed form sign(x)·max(|x| − τ/d, 0).
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1, 200)).astype(np.float32)
    d = rng.uniform(0.1, 2.0, size=(1, 200)).astype(np.float32)
    expected = np.sign(x) * np.maximum(np.abs(x) - 0.3 / d, 0)
    np.testing.assert_allclose(sparsity.prox_group_l2_weighted(x, d, 0.3, axis=1), expected, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(sparsity.prox_l1(x, 0.3, d), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sparsity.prox_l1(x, 0.3), np.sign(x) * np.maximum(np.abs(x) - 0.3, 0), atol=1e-7)


def test_prox_works_under_jit_and_vmap_and_keeps_bf16():
    rng = np.random.default_rng(8)
    xs = rng.normal(size=(4, 3, 3, 6, 5)).astype(np.float32)
    ds = (10 ** rng.uniform(-4, -1, size=xs.shape)).astype(np.float32)
    taus = np.array([1e-3, 5e-3, 1e-2, 0.0], np.float32)
    f = jax.jit(jax.vmap(lambda x, d, t: sparsity.prox_group_l2_weighted(x, d, t, axis=2)))
    batched = np.asarray(f(xs, ds, taus))
    for i in range(4):
        for c in range(6):
            ref = _weighted_prox_bisection(xs[i, :, :, c, :], ds[i, :, :, c, :], taus[i])
            np.testing.assert_allclose(batched[i, :, :, c, :].ravel(), ref, rtol=1e-5, atol=1e-7)
    g = jax.jit(jax.vmap(lambda x, t: sparsity.prox_group_l2(x, t, axis=2)))
    np.testing.assert_allclose(g(xs, taus)[1], sparsity.prox_group_l2(xs[1], taus[1], axis=2), rtol=1e-6)

    xb = jnp.asarray(xs[0], jnp.bfloat16)
    for z, z32 in [
        (
            sparsity.prox_group_l2_weighted(xb, ds[0], 5e-3, axis=2),
            sparsity.prox_group_l2_weighted(np.asarray(xb, np.float32), ds[0], 5e-3, axis=2),
        ),
        (sparsity.prox_group_l2(xb, 1.0, axis=2), sparsity.prox_group_l2(np.asarray(xb, np.float32), 1.0, axis=2)),
        (sparsity.prox_l1(xb, 0.5), sparsity.prox_l1(np.asarray(xb, np.float32), 0.5)),
    ]:
        assert z.dtype == jnp.bfloat16
        # Computed in float32 from the bf16 values, rounded once at the end.
        np.testing.assert_array_equal(np.asarray(z, np.float32), np.asarray(z32.astype(jnp.bfloat16), np.float32))


def test_group_mcp_prox_is_the_minimiser_along_the_ray():
    # The MCP penalty depends on ‖z‖ only, so the prox is collinear with x: z = s·x/‖x‖, s ≥ 0; a fine 1-D
    # search over s is a brute-force minimiser. γ > step keeps the 1-D problem convex.
    rng = np.random.default_rng(9)
    lam, gamma, step = 0.8, 3.0, 1.0
    x = (rng.normal(size=(6, 40)) * rng.uniform(0.05, 1.0, size=40)).astype(np.float32)
    z = np.asarray(sparsity.prox_group_mcp(x, lam, gamma, axis=1, step=step), np.float64)
    s = np.linspace(0, 4, 400001)
    penalty = np.where(s <= gamma * lam, lam * s - s * s / (2 * gamma), 0.5 * gamma * lam**2)
    regions = set()
    for g in range(40):
        nrm = np.linalg.norm(x[:, g].astype(np.float64))
        obj = 0.5 * (s - nrm) ** 2 + step * penalty
        s_best = s[np.argmin(obj)]
        np.testing.assert_allclose(np.linalg.norm(z[:, g]), s_best, atol=2e-5)
        regions.add(0 if nrm <= step * lam else (2 if nrm > gamma * lam else 1))
    assert regions == {0, 1, 2}
    # Weighted with a constant d equals unweighted with step/d.
    c = 4.0
    np.testing.assert_allclose(
        sparsity.prox_group_mcp(x, lam, gamma, axis=1, step=step, d=np.full_like(x, c)),
        sparsity.prox_group_mcp(x, lam, gamma, axis=1, step=step / c),
        rtol=1e-5,
        atol=1e-6,
    )


def test_penalty_values_and_safe_gradient_at_zero_groups():
    rng = np.random.default_rng(10)
    k1 = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
    k1[:, :, 1, :] = 0
    k2 = rng.normal(size=(1, 1, 6, 10)).astype(np.float32)
    params = {
        "backbone": {"a": {"kernel": k1}, "b": {"kernel": k2}, "bn": {"scale": np.ones(6, np.float32)}},
        "head": {"kernel": rng.normal(size=(2, 2, 10, 3)).astype(np.float32)},
    }
    axes = sparsity.default_group_axes(params)
    lam = 0.01
    norms1 = np.sqrt(np.sum(k1.astype(np.float64) ** 2, axis=(0, 1, 3)))
    norms2 = np.sqrt(np.sum(k2.astype(np.float64) ** 2, axis=(0, 1, 3)))
    paper = lam * (np.sqrt(54) * norms1.sum() + np.sqrt(10) * norms2.sum())
    code = lam * (np.sqrt(4) * norms1.sum() + np.sqrt(6) * norms2.sum())
    np.testing.assert_allclose(sparsity.group_lasso_penalty(params, axes, lam), paper, rtol=1e-6)
    np.testing.assert_allclose(sparsity.group_lasso_penalty(params, axes, lam, weighting="num_groups"), code, rtol=1e-6)

    grads = jax.jit(jax.grad(lambda p: sparsity.group_lasso_penalty(p, axes, lam)))(params)
    g1 = np.asarray(grads["backbone"]["a"]["kernel"])
    assert np.all(np.isfinite(g1)) and not np.any(g1[:, :, 1, :])
    expected = lam * np.sqrt(54) * k1 / np.where(norms1 > 0, norms1, 1)[None, None, :, None]
    np.testing.assert_allclose(g1, expected, rtol=1e-5, atol=1e-9)
    assert not np.any(np.asarray(grads["head"]["kernel"]))
    zero_grads = jax.jit(jax.grad(lambda p: sparsity.group_lasso_penalty(p, axes, lam, weighting="num_groups")))(
        jax.tree_util.tree_map(np.zeros_like, params)
    )
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(zero_grads))


def test_mcp_penalty_value():
    x = np.zeros((1, 1, 2, 3), np.float32)
    x[0, 0, 0] = [0.3, 0.0, 0.4]  # norm 0.5, in the concave part (γλ_g = 2·1·√3 ≈ 3.46)
    x[0, 0, 1] = [3.0, 4.0, 0.0]  # norm 5, in the flat part
    params = {"backbone": {"k": {"kernel": x}}}
    lam_g = 1.0 * np.sqrt(3)
    expected = (lam_g * 0.5 - 0.25 / 4) + 0.5 * 2 * lam_g**2
    np.testing.assert_allclose(
        sparsity.group_mcp_penalty(params, sparsity.default_group_axes(params), 1.0, 2.0), expected, rtol=1e-6
    )


@pytest.mark.parametrize("axis", [0, 3, -1])
def test_group_axis_choice(axis):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    z = np.asarray(sparsity.prox_group_l2(x, 2.0, axis=axis))
    moved = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
    zm = np.moveaxis(z, axis, 0).reshape(x.shape[axis], -1)
    for c in range(moved.shape[0]):
        nrm = np.linalg.norm(moved[c])
        np.testing.assert_allclose(zm[c], max(0, 1 - 2.0 / nrm) * moved[c], rtol=1e-6, atol=1e-7)
