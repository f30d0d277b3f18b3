"""Float64 derivative checks of meta-sparsity, run by tests/test_meta.py in a subprocess with JAX_ENABLE_X64=1
(x64 is process-wide in JAX, so it must not leak into the other tests). Prints one JSON object.

The network is a small conv net built from the project's `Conv2d` layers (a 'backbone' of two 3×3 convs, one
dilated, and a 1×1 head per task), so that every operation runs in float64: the project's ResNetD and task
losses compute BatchNorm statistics and losses in float32 by design. The optimizers are the project's real
`prox_adamw` (adaptive prox, Newton solve differentiated implicitly), fresh or continuing from the outer
optimizer's moments ('prox_adamw_warm'), and `sgd` + `group_lasso_prox`.
"""

import dataclasses
import functools
import json
import os
import sys

import jax

assert jax.config.jax_enable_x64, "run with JAX_ENABLE_X64=1"

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mtl_sparse_jax import sparsity, training  # noqa: E402
from mtl_sparse_jax.meta import core  # noqa: E402
from mtl_sparse_jax.models.layers import Conv2d  # noqa: E402

F64 = jnp.float64
TASKS = (("seg", 3), ("normals", 2), ("depth", 1))


class Backbone(nn.Module):
    @nn.compact
    def __call__(self, x):
        conv = functools.partial(Conv2d, dtype=F64, param_dtype=F64)
        x = nn.relu(conv(6, 3, stride=2, name="conv0")(x))
        return jnp.tanh(conv(5, 3, dilation=2, name="conv1")(x))


class TinyNet(nn.Module):
    """The MultiTaskModel interface (params {'backbone', 'head_<task>'}, outputs {task: raw}) in float64."""

    heads: tuple

    @nn.compact
    def __call__(self, x, train=False):
        f = Backbone(name="backbone")(x)
        return {t: Conv2d(c, 1, use_bias=True, dtype=F64, param_dtype=F64, name=f"head_{t}")(f) for t, c in self.heads}


def mse_loss(name, raw, batch):
    err = raw - batch[f"target_{name}"]
    return jnp.sum(err * err), jnp.asarray(err.size, raw.dtype)


def make_spec():
    import tiny_config

    c = tiny_config.get_config()
    c.loss.combiner = "sum"
    base = training.step_spec(c, devices=jax.devices()[:1])
    tasks = tuple(
        dataclasses.replace(t, loss_fn=functools.partial(mse_loss, t.name), options=(("float64_mse", True),))
        for t in base.tasks
    )
    return dataclasses.replace(base, model=TinyNet(heads=TASKS), tasks=tasks)


def batch(rng, n=4, size=8):
    out = {"image": rng.normal(size=(n, size, size, 3))}
    for t, c in TASKS:
        out[f"target_{t}"] = rng.normal(size=(n, size // 2, size // 2, c))
    return jax.tree.map(jnp.asarray, out)


def rel_err(a, b):
    return float(abs(a - b) / max(abs(b), 1e-300))


def omega_numpy(tree):
    """Ω = Σ_layers √C_in Σ_c ‖W[:, :, c, :]‖₂ over backbone kernels, in numpy."""
    total = 0.0
    for name, leaf in tree["backbone"].items():
        w = np.asarray(leaf["kernel"], np.float64)
        c_in = w.shape[2]
        total += np.sqrt(c_in) * sum(np.linalg.norm(w[:, :, c, :]) for c in range(c_in))
    return total


def check_injected_lam():
    """d(update)/dλ of prox_adamw and of sgd+group_lasso_prox with λ as an injected hyperparameter, vs FD."""
    rng = np.random.default_rng(0)
    params = {"k": jnp.asarray(rng.normal(size=(3, 3, 6, 4)) * np.linspace(0.02, 1.0, 6)[None, None, :, None])}
    axes = {"k": 2}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params) for _ in range(3)]
    w = jnp.asarray(rng.normal(size=(3, 3, 6, 4)))
    out = {}
    makers = {
        "prox_adamw": optax.inject_hyperparams(
            sparsity.prox_adamw,
            static_args=("group_axes", "b1", "b2", "eps", "weight_decay", "prox"),
            hyperparam_dtype=F64,
        ),
        "sgd+group_lasso_prox": optax.inject_hyperparams(
            lambda learning_rate, lam: optax.chain(
                optax.sgd(learning_rate), sparsity.group_lasso_prox(learning_rate, lam, axes)
            ),
            hyperparam_dtype=F64,
        ),
    }
    for name, make in makers.items():
        kwargs = {"group_axes": axes, "weight_decay": 0.01} if name == "prox_adamw" else {}
        lam0 = 0.1 if name == "prox_adamw" else 0.5
        opt = make(learning_rate=0.05, lam=lam0, **kwargs)
        state = opt.init(params)
        p = params
        for g in grads[:2]:
            u, state = opt.update(g, state, p)
            p = optax.apply_updates(p, u)

        def f(lam, state=state, p=p, opt=opt):
            hp = dict(state.hyperparams)
            hp["lam"] = lam
            u, _ = opt.update(grads[2], state._replace(hyperparams=hp), p)
            return jnp.sum(w * optax.apply_updates(p, u)["k"])

        h = 1e-5
        g_ad = float(jax.grad(f)(jnp.asarray(lam0, F64)))
        g_fd = float((f(lam0 + h) - f(lam0 - h)) / (2 * h))
        zero_groups = int(
            np.sum(
                np.all(np.asarray(optax.apply_updates(p, opt.update(grads[2], state, p)[0])["k"]) == 0, axis=(0, 1, 3))
            )
        )
        out[name] = {"grad": g_ad, "fd": g_fd, "rel_err": rel_err(g_ad, g_fd), "zero_groups": zero_groups}
    return out


def mspec_for(spec, k, inner, order="second", penalty_in_outer=False):
    return core.MetaSpec(
        step=spec,
        inner_steps=k,
        inner_optimizer=inner,
        inner_lr=0.05 if inner == "sgd" else 0.02,
        order=order,
        penalty_in_outer=penalty_in_outer,
        lam_lr=0.1,
    )


def warm_opt_state(spec, params, data, steps=3):
    """The training optimizer's state after `steps` ordinary steps on all tasks (moments of real gradients), for
    the 'prox_adamw_warm' inner loop; the params themselves are left as they were."""
    tree = training.state.trainable(params, {})
    opt = spec.optimizer_for(tree)
    opt_state = opt.init(tree)
    hp = dict(opt_state.hyperparams, learning_rate=jnp.asarray(0.01, jnp.float32), lam=jnp.asarray(0.0, jnp.float32))
    opt_state = opt_state._replace(hyperparams=hp)
    all_tasks = core.task_mask(spec.task_names, spec.task_names)

    def loss(tr):
        ps, lw = training.state.split_trainable(tr)
        losses, _ = core._forward_losses(spec, ps, {}, data, jax.random.key(0))
        return core.objective(spec, losses, lw, all_tasks)

    p = tree
    for _ in range(steps):
        updates, opt_state = opt.update(jax.grad(loss)(p), opt_state, p)
        p = optax.apply_updates(p, updates)
    return opt_state


def main():
    spec = make_spec()
    rng = np.random.default_rng(1)
    support, query = batch(rng), batch(rng)
    variables = spec.model.init({"params": jax.random.key(0)}, support["image"])
    params = jax.tree.map(lambda x: x.astype(F64), dict(variables["params"]))
    state = training.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats={},
        loss_weights={},
        opt_state=None,
        task_active={t: jnp.ones(()) for t in spec.task_names},
    )
    mask = core.task_mask(spec.task_names, ("normals", "depth"))  # 'seg' out: its head gets exactly zero grads
    key = jax.random.key(3)
    state = state.replace(opt_state=warm_opt_state(spec, params, batch(rng)))
    results = {"injected_lam": check_injected_lam(), "second_order": {}, "first_order": {}, "hybrid": {}}

    # Second order: dF/dρ vs central differences, and a directional θ₀-derivative.
    tree0 = training.state.trainable(params, {})

    def zero_groups(theta):
        return sum(
            int(np.sum(np.all(np.asarray(leaf["kernel"]) == 0, axis=(0, 1, 3)))) for leaf in theta["backbone"].values()
        )

    def calibrated_lam(mspec):
        """A λ of a log grid at which the inner loop zeroes some, but not all, of the 9 backbone groups (the one
        closest to half), so that the derivative runs through both zeroed and shrunk groups."""
        inner = jax.jit(lambda lam: core.inner_loop(mspec, lam, tree0, {}, support, mask, key, state.opt_state)[0])
        grid = np.logspace(-6, 1, 43)
        counts = [zero_groups(inner(jnp.asarray(lam, F64))) for lam in grid]
        partial = [(abs(c - 4.5), lam) for c, lam in zip(counts, grid) if 0 < c < 9]
        assert partial, f"no λ of the grid gives a partly sparse θ_K: {list(zip(grid.tolist(), counts))}"
        return float(min(partial)[1])

    for k, inner in ((1, "prox_adamw"), (3, "prox_adamw"), (3, "sgd"), (1, "prox_adamw_warm"), (3, "prox_adamw_warm")):
        mspec = mspec_for(spec, k, inner)
        lam0 = calibrated_lam(mspec)
        f = jax.jit(lambda r, st, m=mspec: core.meta_loss(m, r, st, support, query, mask, key))
        rho0 = jnp.asarray(np.log(lam0), F64)
        g = float(jax.jit(jax.grad(f))(rho0, state))
        h = 1e-4
        fd = float((f(rho0 + h, state) - f(rho0 - h, state)) / (2 * h))
        zero = zero_groups(core.inner_loop(mspec, jnp.exp(rho0), tree0, {}, support, mask, key, state.opt_state)[0])
        v = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(7).normal(size=p.shape)), params)
        g_theta = jax.jit(jax.grad(lambda st: f(rho0, st), allow_int=True))(state).params
        dir_ad = float(sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(g_theta), jax.tree.leaves(v))))
        eps = 1e-5
        plus = state.replace(params=jax.tree.map(lambda p, d: p + eps * d, params, v))
        minus = state.replace(params=jax.tree.map(lambda p, d: p - eps * d, params, v))
        dir_fd = float((f(rho0, plus) - f(rho0, minus)) / (2 * eps))
        seg_head_grad = float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(g_theta["head_seg"])))
        results["second_order"][f"K={k},{inner}"] = {
            "lam": lam0,
            "grad": g,
            "fd": fd,
            "rel_err": rel_err(g, fd),
            "dir_grad": dir_ad,
            "dir_fd": dir_fd,
            "dir_rel_err": rel_err(dir_ad, dir_fd),
            "zero_groups_theta_k": zero,
            "seg_head_grad_abs_sum": seg_head_grad,
            "finite": bool(np.isfinite(g) and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g_theta))),
        }

    # First order: dF/dρ = λ·Ω(θ_K) with the penalty in the outer loss, 0 without it.
    lam_fo = results["second_order"]["K=3,prox_adamw"]["lam"]
    for penalty_in_outer in (True, False):
        mspec = mspec_for(spec, 3, "prox_adamw", order="first", penalty_in_outer=penalty_in_outer)
        rho0 = jnp.asarray(np.log(lam_fo), F64)
        tree = training.state.trainable(params, {})
        _, aux = core.meta_objective(mspec, rho0, tree, {}, support, query, mask, key)
        g = float(jax.grad(lambda r, m=mspec: core.meta_loss(m, r, state, support, query, mask, key))(rho0))
        expected = lam_fo * omega_numpy(aux["theta_k"]) if penalty_in_outer else 0.0
        g_theta = jax.grad(lambda tr, m=mspec: core.meta_objective(m, rho0, tr, {}, support, query, mask, key)[0])(tree)

        def at_theta_k(tk, m=mspec):
            ps, lw = training.state.split_trainable(tk)
            losses, _ = core._forward_losses(spec, ps, {}, query, jax.random.fold_in(key, m.inner_steps))
            total = core.objective(spec, losses, lw, mask)
            return total + (core.penalty(spec, tk, jnp.exp(rho0)) if m.penalty_in_outer else 0.0)

        g_direct = jax.grad(at_theta_k)(jax.lax.stop_gradient(aux["theta_k"]))
        theta_err = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(g_theta), jax.tree.leaves(g_direct))
        )
        results["first_order"][f"penalty_in_outer={penalty_in_outer}"] = {
            "grad": g,
            "expected": expected,
            "abs_err": abs(g - expected),
            "theta_grad_max_abs_err": theta_err,
        }
    # prox_adamw_warm's first inner step is one step of the outer optimizer from the state's moments.
    lam_w = results["second_order"]["K=1,prox_adamw_warm"]["lam"]
    mspec = mspec_for(spec, 1, "prox_adamw_warm")
    theta_1 = core.inner_loop(mspec, jnp.asarray(lam_w, F64), tree0, {}, support, mask, key, state.opt_state)[0]

    def support_loss(tr):
        ps, lw = training.state.split_trainable(tr)
        losses, _ = core._forward_losses(spec, ps, {}, support, jax.random.fold_in(key, 0))
        return core.objective(spec, losses, lw, mask)

    opt = spec.optimizer_for(tree0)
    hp = dict(state.opt_state.hyperparams, lam=jnp.asarray(lam_w, F64), learning_rate=jnp.asarray(0.02, jnp.float32))
    expected = optax.apply_updates(
        tree0, opt.update(jax.grad(support_loss)(tree0), state.opt_state._replace(hyperparams=hp), tree0)[0]
    )
    fresh = core.inner_loop(mspec_for(spec, 1, "prox_adamw"), jnp.asarray(lam_w, F64), tree0, {}, support, mask, key)[0]
    results["warm_step"] = {
        "max_abs_err": max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(theta_1), jax.tree.leaves(expected))
        ),
        "max_abs_diff_from_fresh": max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(theta_1), jax.tree.leaves(fresh))
        ),
    }

    # Hybrid: dF/dρ exact (central differences), θ₀-gradient = the query gradient at θ_K.
    for k in (1, 3):
        mspec = mspec_for(spec, k, "prox_adamw_warm", order="hybrid")
        rho0 = jnp.asarray(np.log(results["second_order"][f"K={k},prox_adamw_warm"]["lam"]), F64)
        f = jax.jit(lambda r, m=mspec: core.meta_loss(m, r, state, support, query, mask, key))
        g = float(jax.jit(jax.grad(f))(rho0))
        h = 1e-4
        fd = float((f(rho0 + h) - f(rho0 - h)) / (2 * h))
        tree = training.state.trainable(params, {})
        obj = functools.partial(core.meta_objective, mspec, rho0)
        _, aux = obj(tree, {}, support, query, mask, key, state.opt_state)
        g_theta = jax.grad(lambda tr: obj(tr, {}, support, query, mask, key, state.opt_state)[0])(tree)

        def at_theta_k(tk, m=mspec, rho0=rho0):
            ps, lw = training.state.split_trainable(tk)
            losses, _ = core._forward_losses(spec, ps, {}, query, jax.random.fold_in(key, m.inner_steps))
            return core.objective(spec, losses, lw, mask)

        g_direct = jax.grad(at_theta_k)(jax.lax.stop_gradient(aux["theta_k"]))
        results["hybrid"][f"K={k}"] = {
            "grad": g,
            "fd": fd,
            "rel_err": rel_err(g, fd),
            "theta_grad_max_abs_err": max(
                float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(g_theta), jax.tree.leaves(g_direct))
            ),
            "theta_grad_max_abs": max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(g_direct)),
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
