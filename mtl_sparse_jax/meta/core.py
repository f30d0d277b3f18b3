"""Meta-sparsity's math: task-subset episodes, the unrolled proximal inner loop, `meta_loss` and the meta step.

An episode draws a task subset S, a support batch (train) and a query batch (`meta.query_split`). From the
current parameters θ₀ it takes K inner steps of the project's proximal optimizer on the support loss of S, at
the current λ = exp(ρ):

    θ_{k+1} = P_λ(θ_k, ∇_θ L^sup_S(θ_k), inner optimizer state_k)          k = 0 … K−1

where P_λ is `prox_adamw` with fresh moments each episode ('prox_adamw'), `sgd` followed by `group_lasso_prox`
(ISTA, 'sgd'), or the outer optimizer itself continuing from its current moments and step count
('prox_adamw_warm'), all at lr `meta.inner_lr`. With 'prox_adamw_warm' the inner prox is the very prox that the
outer step applies, with the same preconditioner d = √ν + ε, so dF/dρ is about the λ that shapes the backbone;
with fresh moments d = √((1−β2)g²) + ε of one support gradient, a different scale (the adaptive prox zeroes a
group when ‖d ⊙ θ_g‖ ≤ lr·λ·√n_g). The inner steps' moment updates are discarded (θ_K is a look-ahead). The outer
objective is the query loss of S at θ_K,

    F(ρ, θ₀) = Σ_{t∈S} L_t(θ_K; query)   [+ λ·Ω(θ_K) with meta.penalty_in_outer]

(with `loss.combiner='sum'`; another combiner weights the terms as in training), Ω(θ) = Σ_layers √C_in Σ_c ‖W_c‖₂
(the reference's loss-form penalty). F depends on λ through every prox in the inner loop, so dF/dρ is a real
hypergradient, not just the explicit penalty term.

Orders (`meta.order`):

* 'second': `jax.grad` of F through the K unrolled steps (each step under `jax.checkpoint`, so memory is one
  step's activations plus K parameter copies). The prox's dependence on λ is differentiated by the implicit
  function theorem (`sparsity.prox`), Adam's √v is zero-safe, so a gradient element that is exactly zero (a
  masked-out head, a kernel tap that only reads padding) gives a derivative of 0, not NaN.
* 'first' (FOMAML): θ_K is treated as a constant of θ₀ plus an identity (∂θ_K/∂θ₀ := I, ∂θ_K/∂ρ := 0). The
  θ₀-gradient is then ∇_θ F evaluated at θ_K, and ρ gets only the explicit term:

      dF/dρ = λ·Ω(θ_K)   with meta.penalty_in_outer,   0 without it   (λ = exp(ρ), dλ/dρ = λ).

  This is ≥ 0, so gradient descent on ρ can only shrink λ (or leave it where it is). This is why the
  reference's first-order development code, where λ enters the query loss only through λ·Ω, can only push λ
  down: the data-fit part of the objective never sees λ unless the gradient flows through a prox.
* 'hybrid': ρ as in 'second' (dF/dρ exact, through the K unrolled steps and every prox), θ₀ as in 'first'
  (∇_θ F at θ_K). Implemented as θ_K = θ₀ − sg(θ₀) + Φ_K(sg(θ₀), ρ), sg = stop_gradient, Φ_K the inner loop:
  its value is θ_K, ∂θ_K/∂θ₀ := I, ∂θ_K/∂ρ = ∂Φ_K/∂ρ. The second-order θ₀-gradient passes through
  ∂θ_K/∂θ₀, which for an Adam-type step contains α(1−β1)·H/(√ν+ε) (H the support Hessian), i.e. entries up to
  α/ε where ν is small; the outer optimizer's ν then grows far beyond that of ordinary training, and the
  adaptive prox, which zeroes a group when ‖(√ν+ε) ⊙ θ_g‖ ≤ lr·λ·√n_g, needs a λ larger by as much to zero the
  same groups. With 'hybrid' the outer step sees gradients of the ordinary scale, so λ means in the outer prox
  what it means in ordinary sparse training, while ρ keeps its exact hypergradient.

The outer update applies the training optimizer (proximal AdamW at the current λ, lr `optimizer.lr`) to the
meta-gradient of θ₀, so the shared backbone ends sparse; ρ is updated by Adam (lr `meta.lam_lr`). Both may
accumulate over `meta.outer_every` episodes. Batch statistics follow the first inner step's forward pass (θ₀ on
the support batch), as in an ordinary train step.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_sparse_jax import sparsity
from mtl_sparse_jax.training import state as state_lib
from mtl_sparse_jax.training import step as step_lib
from mtl_sparse_jax.training.spec import StepSpec

INNER_OPTIMIZERS = ("prox_adamw", "sgd", "prox_adamw_warm")
ORDERS = ("first", "second", "hybrid")


@dataclasses.dataclass(frozen=True)
class MetaSpec:
    """The static part of a meta step (hashable): the train step's spec plus the meta-learning settings."""

    step: StepSpec
    inner_steps: int
    inner_optimizer: str
    inner_lr: float
    order: str
    penalty_in_outer: bool
    lam_lr: float
    remat: bool = True


def meta_spec(config, spec: StepSpec) -> MetaSpec:
    m = config.meta
    return MetaSpec(
        step=spec,
        inner_steps=int(m.inner_steps),
        inner_optimizer=m.inner_optimizer,
        inner_lr=float(m.inner_lr),
        order=m.order,
        penalty_in_outer=bool(m.penalty_in_outer),
        lam_lr=float(m.lam_lr),
        remat=bool(m.remat),
    )


# ---------------------------------------------------------------------------------------------------------------
# Episodes


def task_subsets(tasks, min_tasks: int = 1) -> list[tuple[str, ...]]:
    """All subsets of `tasks` with at least `min_tasks` members, in a fixed order (by size, then config order)."""
    tasks = tuple(tasks)
    out = []
    for size in range(max(min_tasks, 1), len(tasks) + 1):
        out.extend(itertools.combinations(tasks, size))
    return out


def draw_subsets(tasks, min_tasks: int, seed: int, epoch: int, count: int) -> list[tuple[str, ...]]:
    """`count` subsets drawn uniformly (with replacement) for one epoch; a function of (seed, epoch) only, so a
    resumed run draws the same episodes."""
    pool = task_subsets(tasks, min_tasks)
    rng = np.random.default_rng([seed, epoch, 0x3E7A])
    return [pool[i] for i in rng.integers(0, len(pool), size=count)]


def task_mask(tasks, subset) -> dict[str, jax.Array]:
    """{task: 1. if in the subset else 0.} as float32 arrays (traced, so one compiled step serves every subset)."""
    return {t: jnp.asarray(1.0 if t in subset else 0.0, jnp.float32) for t in tasks}


# ---------------------------------------------------------------------------------------------------------------
# The objective


def objective(spec: StepSpec, losses: dict, loss_weights, mask: dict):
    """The combined loss of the tasks in the mask. For 'sum' this is Σ_{t∈S} L_t in the losses' own dtype (so
    float64 stays float64); other combiners go through the training's `total_loss`."""
    if spec.combiner == "sum":
        return sum(jnp.where(mask[t] > 0, losses[t], jnp.zeros_like(losses[t])) for t in spec.task_names)
    return step_lib.total_loss(spec, losses, loss_weights, mask)


def penalty(spec: StepSpec, tree, lam):
    """λ·Ω(θ), Ω = Σ_layers √C_in Σ_c ‖W_c‖₂ over the grouped kernels (the reference's loss-form penalty)."""
    return sparsity.group_lasso_penalty(tree, spec.group_axes(tree), lam, weighting="num_groups")


def _forward_losses(spec: StepSpec, params, batch_stats, batch, rng):
    outputs, new_vars = spec.model.apply(
        {"params": params, "batch_stats": batch_stats},
        batch["image"],
        train=True,
        mutable=["batch_stats"],
        rngs={"dropout": rng},
    )
    return step_lib.task_losses(spec, outputs, batch), new_vars.get("batch_stats", batch_stats)


def inner_optimizer(mspec: MetaSpec, lam, tree, outer_opt_state=None):
    """(the inner loop's proximal optimizer at (possibly traced) λ, its initial state). 'prox_adamw_warm' starts
    from `outer_opt_state` (the outer optimizer's, with λ and lr replaced); the others from fresh moments."""
    if mspec.inner_optimizer == "prox_adamw_warm":
        if outer_opt_state is None:
            raise ValueError("inner_optimizer 'prox_adamw_warm' needs the outer optimizer's state")
        hp = dict(outer_opt_state.hyperparams)
        hp["lam"] = lam  # not cast: float64 λ stays float64 in the derivative checks
        hp["learning_rate"] = jnp.asarray(mspec.inner_lr, hp["learning_rate"].dtype)
        return mspec.step.optimizer_for(tree), outer_opt_state._replace(hyperparams=hp)
    opt = _fresh_inner_optimizer(mspec, lam, tree)
    return opt, opt.init(tree)


def _fresh_inner_optimizer(mspec: MetaSpec, lam, tree) -> optax.GradientTransformation:
    axes = mspec.step.group_axes(tree)
    o = mspec.step.optimizer
    if mspec.inner_optimizer == "prox_adamw":
        return sparsity.prox_adamw(
            mspec.inner_lr, lam, axes, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, prox=o.prox
        )
    return optax.chain(optax.sgd(mspec.inner_lr), sparsity.group_lasso_prox(mspec.inner_lr, lam, axes, mode="group"))


def inner_loop(mspec: MetaSpec, lam, tree, batch_stats, support, mask, rng, outer_opt_state=None):
    """K proximal steps from `tree` on the support loss of the subset: (θ_K, batch stats after step 1, losses)."""
    spec = mspec.step
    opt, opt_state = inner_optimizer(mspec, lam, tree, outer_opt_state)

    def one_step(tree, opt_state, k):
        def loss_fn(tree):
            params, loss_weights = state_lib.split_trainable(tree)
            losses, new_bs = _forward_losses(spec, params, batch_stats, support, jax.random.fold_in(rng, k))
            total = objective(spec, losses, loss_weights, mask)
            if spec.penalty_in_loss:
                total = total + penalty(spec, tree, lam)
            return total, new_bs

        (loss, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(tree)
        updates, opt_state = opt.update(grads, opt_state, tree)
        return optax.apply_updates(tree, updates), opt_state, loss, new_bs

    if mspec.remat:
        one_step = jax.checkpoint(one_step, static_argnums=(2,))
    first_bs, support_losses = None, []
    for k in range(mspec.inner_steps):
        tree, opt_state, loss, new_bs = one_step(tree, opt_state, k)
        support_losses.append(loss)
        if k == 0:
            first_bs = new_bs
    return tree, first_bs, jnp.stack(support_losses)


def meta_objective(mspec: MetaSpec, rho, tree, batch_stats, support, query, mask, rng, outer_opt_state=None):
    """F(ρ, θ₀) and its aux (θ_K, batch stats, support and query losses). See the module docstring.
    `outer_opt_state` (a constant) is read by inner_optimizer 'prox_adamw_warm' only."""
    spec = mspec.step
    lam = jnp.exp(rho)
    start = jax.lax.stop_gradient(tree) if mspec.order == "hybrid" else tree
    theta_k, new_bs, support_losses = inner_loop(mspec, lam, start, batch_stats, support, mask, rng, outer_opt_state)
    if mspec.order == "hybrid":  # value θ_K, ∂/∂θ₀ = I, ∂/∂ρ through the inner loop
        theta_k = jax.tree.map(lambda t0, s0, tk: t0 - s0 + tk, tree, start, theta_k)
    if mspec.order == "first":
        # FOMAML: θ_K = θ₀ + const, so ∇_θ₀ F = ∇_θ F(θ_K) and ρ sees no path through the inner loop. A zeroed
        # group stays exactly zero (x + (0 − x) = 0 in IEEE arithmetic).
        theta_k = jax.tree.map(lambda t0, tk: t0 + jax.lax.stop_gradient(tk - t0), tree, theta_k)
    params, loss_weights = state_lib.split_trainable(theta_k)
    losses, _ = _forward_losses(spec, params, batch_stats, query, jax.random.fold_in(rng, mspec.inner_steps))
    total = objective(spec, losses, loss_weights, mask)
    if mspec.penalty_in_outer:
        total = total + penalty(spec, theta_k, lam)
    aux = {"theta_k": theta_k, "batch_stats": new_bs, "support_losses": support_losses, "query_losses": losses}
    return total, aux


def meta_loss(mspec: MetaSpec, rho, state: state_lib.TrainState, support, query, task_mask, rng):
    """The meta-objective F(ρ, θ₀) of one episode, a scalar; `jax.grad(meta_loss, argnums=1)` is dF/dρ.

    θ₀ = the state's params and loss weights; K = mspec.inner_steps proximal steps on `support` with λ = exp(ρ)
    for the tasks with task_mask[t] = 1, then Σ_{t∈S} L_t(θ_K; query) (+ λ·Ω(θ_K) with penalty_in_outer). With
    order 'second' or 'hybrid' the gradient runs through the unrolled steps (and the prox, implicitly); with
    'first' it is λ·Ω(θ_K)·[penalty_in_outer]. With inner optimizer 'prox_adamw_warm' the inner steps start from the state's
    optimizer state (a constant here). Pure: no donation, no state change.
    """
    tree = state_lib.trainable(state.params, state.loss_weights)
    total, _ = meta_objective(mspec, rho, tree, state.batch_stats, support, query, task_mask, rng, state.opt_state)
    return total


# ---------------------------------------------------------------------------------------------------------------
# The meta state and step


@flax.struct.dataclass
class MetaState:
    train: state_lib.TrainState  # θ, batch stats, the outer (proximal) optimizer state
    rho: jax.Array  # log λ, float32 []
    rho_opt: Any  # Adam state of ρ
    acc_grads: Any  # meta-gradients of θ summed since the last outer update (tree like `trainable`)
    acc_rho: jax.Array
    acc_count: jax.Array  # episodes accumulated


def rho_optimizer(mspec: MetaSpec) -> optax.GradientTransformation:
    return optax.adam(mspec.lam_lr)


def init_meta_state(mspec: MetaSpec, train_state: state_lib.TrainState, lam_init: float) -> MetaState:
    rho = jnp.asarray(np.log(lam_init), jnp.float32)
    tree = state_lib.trainable(train_state.params, train_state.loss_weights)
    return MetaState(
        train=train_state,
        rho=rho,
        rho_opt=rho_optimizer(mspec).init(rho),
        acc_grads=jax.tree.map(jnp.zeros_like, tree),
        acc_rho=jnp.zeros((), jnp.float32),
        acc_count=jnp.zeros((), jnp.int32),
    )


def lam_of(mstate: MetaState) -> float:
    return float(np.exp(np.float64(jax.device_get(mstate.rho))))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def meta_step(mspec: MetaSpec, apply_update: bool, mstate: MetaState, support, query, mask, rng):
    """One episode: accumulate the meta-gradients; with `apply_update`, take the outer step on θ (proximal
    AdamW at the current λ) and the Adam step on ρ from the accumulated mean. Returns (state, episode log)."""
    spec = mspec.step
    ts = mstate.train
    tree = state_lib.trainable(ts.params, ts.loss_weights)
    (total, aux), (g_rho, g_tree) = jax.value_and_grad(
        functools.partial(meta_objective, mspec), argnums=(0, 1), has_aux=True
    )(mstate.rho, tree, ts.batch_stats, support, query, mask, rng, ts.opt_state)
    acc_grads = jax.tree.map(jnp.add, mstate.acc_grads, g_tree)
    acc_rho = mstate.acc_rho + g_rho
    acc_count = mstate.acc_count + 1
    ts = ts.replace(batch_stats=aux["batch_stats"])
    rho, rho_opt = mstate.rho, mstate.rho_opt
    if apply_update:
        n = acc_count.astype(jnp.float32)
        mean_grads = jax.tree.map(lambda g: g / n, acc_grads)
        lam = jnp.exp(mstate.rho)
        hp = dict(ts.opt_state.hyperparams)
        hp["lam"] = lam.astype(hp["lam"].dtype)
        opt_state = ts.opt_state._replace(hyperparams=hp)
        updates, opt_state = spec.optimizer_for(tree).update(mean_grads, opt_state, tree)
        new_params, new_lw = state_lib.split_trainable(optax.apply_updates(tree, updates))
        ts = ts.replace(step=ts.step + 1, params=new_params, loss_weights=new_lw, opt_state=opt_state)
        rho_updates, rho_opt = rho_optimizer(mspec).update(acc_rho / n, rho_opt, rho)
        rho = optax.apply_updates(rho, rho_updates)
        acc_grads = jax.tree.map(jnp.zeros_like, acc_grads)
        acc_rho = jnp.zeros_like(acc_rho)
        acc_count = jnp.zeros_like(acc_count)
    new = MetaState(train=ts, rho=rho, rho_opt=rho_opt, acc_grads=acc_grads, acc_rho=acc_rho, acc_count=acc_count)
    log = {
        "query_loss": total,
        "grad_rho": g_rho,
        "support_loss": aux["support_losses"][0],
        **{f"query/{t}": v for t, v in aux["query_losses"].items()},
    }
    return jax.lax.with_sharding_constraint((new, log), spec.replicated)
