"""How far the outer prox is from zeroing groups, read from a run's last checkpoint (meta or ordinary).

  python -m mtl_sparse_jax.meta.diagnose WORKDIR [WORKDIR ...]

`prox_adamw`'s adaptive prox zeroes group g iff ‖d_g ⊙ x_g‖₂ ≤ τ_g, with d = √ν + ε (ν not bias-corrected) and
τ_g = lr·λ·√n_g. For the current parameters θ and moments ν this gives

    λ*_g = ‖d_g ⊙ θ_g‖₂ / (lr·√n_g)

the λ at which the prox, applied to θ itself, would zero the group. Gradients of a larger scale give a larger ν,
hence a larger λ* for the same weights: the same λ zeroes fewer groups. One line per workdir: the final λ, the
group sparsity, the 10th percentile and median of λ* over the groups still non-zero, and the RMS of √ν averaged
over the grouped leaves. WORKDIR is a meta-training workdir (with meta_train/) or an ordinary one (trial_0/).
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

from mtl_sparse_jax import checkpoint as ckpt_lib
from mtl_sparse_jax import config_utils
from mtl_sparse_jax.sparsity import groups as groups_lib


def zeroing_lambdas(tree, nu, group_axes, lr: float, eps: float) -> np.ndarray:
    """λ*_g of every group of every grouped leaf (numpy, float64), in leaf order; 0 for a group already zero."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    axes = treedef.flatten_up_to(group_axes)
    nus = treedef.flatten_up_to(nu)
    out = []
    for p, axis, v in zip(leaves, axes, nus):
        if axis is None:
            continue
        p = np.asarray(p, np.float64)
        d = np.sqrt(np.asarray(v, np.float64)) + eps
        others = tuple(i for i in range(p.ndim) if i != axis % p.ndim)
        n = groups_lib.group_size(p.shape, axis)
        out.append(np.sqrt(np.sum((d * p) ** 2, axis=others)) / (lr * np.sqrt(n)))
    return np.concatenate(out)


def _adam_state(opt_state):
    found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: hasattr(x, "nu")) if hasattr(x, "nu")]
    if not found:
        raise ValueError("the optimizer state has no second moments (nu); the optimizer is not prox_adamw")
    return found[0]


def read_run(workdir: str) -> dict:
    """{'lam', 'tree', 'nu', 'group_axes', 'lr', 'eps'} of the last checkpoint of a meta or ordinary run."""
    from mtl_sparse_jax.meta import core
    from mtl_sparse_jax.meta import run as meta_run
    from mtl_sparse_jax.training import loop as loop_lib
    from mtl_sparse_jax.training import state as state_lib
    from mtl_sparse_jax.training.spec import step_spec

    config = config_utils.load(os.path.join(workdir, "config.json"))
    spec = step_spec(config)
    image_size = tuple(loop_lib.load_data_manifest(config)["image_size"])
    if os.path.isdir(os.path.join(workdir, "meta_train", "checkpoints")):
        ckpts = ckpt_lib.TrialCheckpoints(os.path.join(workdir, "meta_train", "checkpoints"))
        mstate, _ = ckpts.restore(
            "latest", meta_run.abstract_meta_state(core.meta_spec(config, spec), spec, image_size)
        )
        state, lam = mstate.train, core.lam_of(mstate)
    else:
        ckpts = ckpt_lib.TrialCheckpoints(os.path.join(workdir, "trial_0", "checkpoints"))
        state, _ = ckpts.restore("latest", state_lib.abstract_train_state(spec, image_size))
        lam = float(config.sparsity.lam)
    ckpts.close()
    tree = state_lib.trainable(state.params, state.loss_weights)
    return {
        "lam": lam,
        "tree": tree,
        "nu": _adam_state(state.opt_state).nu,
        "group_axes": spec.group_axes(tree),
        "lr": float(config.optimizer.lr),
        "eps": float(config.optimizer.eps),
    }


def summary_line(workdir: str) -> str:
    r = read_run(workdir)
    lam_star = zeroing_lambdas(r["tree"], r["nu"], r["group_axes"], r["lr"], r["eps"])
    live = lam_star[lam_star > 0]
    treedef = jax.tree_util.tree_structure(r["tree"])
    pairs = zip(treedef.flatten_up_to(r["nu"]), treedef.flatten_up_to(r["group_axes"]))
    rms = float(np.mean([np.sqrt(np.mean(np.asarray(v, np.float64))) for v, axis in pairs if axis is not None]))
    zero = 100.0 * float(np.mean(lam_star == 0))
    return (
        f"{workdir}: λ={r['lam']:.3g} group sparsity {zero:.1f}% of {lam_star.size} groups | λ* of the non-zero "
        f"groups: 10th percentile {np.percentile(live, 10):.3g}, median {np.median(live):.3g} | "
        f"mean RMS √ν {rms:.3g}"
    )


def main(argv) -> int:
    if not argv:
        print("usage: python -m mtl_sparse_jax.meta.diagnose WORKDIR [WORKDIR ...]", file=sys.stderr)
        return 2
    for workdir in argv:
        print(summary_line(workdir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
