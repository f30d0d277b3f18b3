"""Cost of one `sparsity.prox_adamw` update relative to `optax.adamw`, on a ResNetD-50-shaped params tree.

    python benchmarks/prox_overhead.py                       # full table: widths 0.25/0.5/1/2, plus NYU heads
    python benchmarks/prox_overhead.py --widths 1 --repeats 5

The params tree has the exact conv shapes of the reference's ResNetD-50 backbone (reference §2.1: deep 3-conv stem,
bottleneck stages [3, 4, 6, 3] with planes 64/128/256/512, a 1×1 downsample in block 0 of every stage; 55 conv
kernels, 22,787 input-channel groups, 23,578,304 conv weights at width 1), built here from the table rather than
imported from the models, plus BatchNorm scale/bias per conv. `--heads nyu` adds three DeepLab heads (reference
§2.3; 41/1/3 outputs), which adamw updates and the prox does not touch.

Each optimizer update (`tx.update` + `optax.apply_updates`) is jitted, warmed up, then timed with
`block_until_ready`, the optimizers taking turns in each of `--repeats` rounds; the table has the median time of
each and the median over rounds of the per-round ratio adaptive / adamw. Gradients are random with Adam-like scales and the
state is fresh, so d = √v + ε spans ~1e-6…1e-3 as in the first steps of an epoch of the reference.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mtl_sparse_jax import sparsity  # noqa: E402

STAGES = ((1, 64, 3), (2, 128, 4), (3, 256, 6), (4, 512, 3))  # (stage, planes, blocks); expansion 4


def resnetd50_conv_shapes(width: float = 1.0) -> dict[str, tuple[int, int, int, int]]:
    """'backbone/<module>/kernel' -> HWIO shape, in forward order, for ResNetD-50 with channels × width."""
    w = lambda c: max(1, int(round(c * width)))
    shapes = {}
    for i, (cin, cout) in enumerate([(3, w(64)), (w(64), w(64)), (w(64), w(128))], start=1):
        shapes[f"backbone/stem_conv{i}/kernel"] = (3, 3, cin, cout)
    inplanes = w(128)
    for stage, planes, blocks in STAGES:
        p, out = w(planes), w(planes * 4)
        for b in range(blocks):
            cin = inplanes if b == 0 else out
            pre = f"backbone/layer{stage}_{b}"
            shapes[f"{pre}/conv1/kernel"] = (1, 1, cin, p)
            shapes[f"{pre}/conv2/kernel"] = (3, 3, p, p)
            shapes[f"{pre}/conv3/kernel"] = (1, 1, p, out)
            if b == 0:
                shapes[f"{pre}/downsample_conv/kernel"] = (1, 1, cin, out)
        inplanes = out
    return shapes


def deeplab_head_shapes(name: str, num_out: int, cin: int = 2048) -> dict[str, tuple[int, ...]]:
    """Reference §2.3: ASPP (1×1, three dilated 3×3, pooled 1×1; 256 each), 1×1 projection, 3×3 conv, 1×1 classifier."""
    s = {f"{name}/aspp_conv0/kernel": (1, 1, cin, 256), f"{name}/aspp_pool_conv/kernel": (1, 1, cin, 256)}
    for i in (1, 2, 3):
        s[f"{name}/aspp_conv{i}/kernel"] = (3, 3, cin, 256)
    s[f"{name}/project/kernel"] = (1, 1, 1280, 256)
    s[f"{name}/conv/kernel"] = (3, 3, 256, 256)
    for k in list(s):
        s[k.replace("/kernel", "_bn/scale")] = (s[k][-1],)
        s[k.replace("/kernel", "_bn/bias")] = (s[k][-1],)
    s[f"{name}/classifier/kernel"] = (1, 1, 256, num_out)
    s[f"{name}/classifier/bias"] = (num_out,)
    return s


def params_tree(width: float, heads: str) -> dict:
    shapes = dict(resnetd50_conv_shapes(width))
    for path, shape in list(shapes.items()):
        bn = path.replace("conv", "bn").replace("/kernel", "")
        shapes[f"{bn}/scale"] = (shape[-1],)
        shapes[f"{bn}/bias"] = (shape[-1],)
    if heads == "nyu":
        for task, n in (("seg", 41), ("depth", 1), ("normals", 3)):
            shapes.update(deeplab_head_shapes(f"head_{task}", n, cin=max(1, int(round(2048 * width)))))
    key = jax.random.PRNGKey(0)
    tree: dict = {}
    for i, (path, shape) in enumerate(sorted(shapes.items())):
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        leaf = jax.random.uniform(jax.random.fold_in(key, i), shape, jnp.float32, -1, 1) / np.sqrt(fan_in)
        node = tree
        *parents, name = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return tree


def compile_update(tx, params, grads):
    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    jax.block_until_ready(step(params, state, grads))  # compile
    jax.block_until_ready(step(params, state, grads))  # warm-up
    return lambda: step(params, state, grads)


def time_round_robin(fns: dict, repeats: int) -> dict:
    """Times each fn once per round, rounds interleaved, so that load from other jobs hits all of them alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return times


def newton_iterations(params, grads, lr, lam):
    """Newton iterations of the adaptive prox per grouped kernel in the first prox_adamw step (fresh state)."""
    axes = sparsity.default_group_axes(params)
    flat_g = {path: g for path, g, _ in sparsity.flatten_grouped(grads, axes)}
    out = []
    for path, leaf, axis in sparsity.flatten_grouped(params, axes):
        g = flat_g[path]
        d = jnp.sqrt(1e-3 * g * g) + 1e-6  # t = 1: v = (1 − β2)·g²
        x = leaf - lr * np.sqrt(1e-3) * g / d  # α_1·m/d with α_1 = lr·√(1 − β2)/(1 − β1), m = (1 − β1)·g
        tau = lr * lam * np.sqrt(sparsity.group_size(leaf.shape, axis))
        _, n = sparsity.prox_group_l2_weighted(x, d, tau, axis=axis, return_iterations=True)
        out.append(int(n))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", default="0.25,0.5,1,2")
    ap.add_argument(
        "--heads",
        default="nyu",
        choices=("nyu", "none"),
        help="also time width 1 with the three NYU DeepLab heads ('none' to skip)",
    )
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lam", type=float, default=1e-5)
    args = ap.parse_args(argv)

    print(
        f"# jax {jax.__version__}, optax {optax.__version__}, backend {jax.default_backend()}, "
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores, {platform.machine()}"
    )
    print(
        f"# lr {args.lr}, lam {args.lam}, median of {args.repeats} interleaved rounds after warm-up; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    txs = {
        "optax.adamw": optax.adamw(args.lr, eps=1e-6, weight_decay=0.1),
        "prox_adamw(prox='none')": sparsity.prox_adamw(
            args.lr, 0.0, sparsity.default_group_axes, weight_decay=0.1, prox="none"
        ),
        "prox_adamw(prox='euclidean')": sparsity.prox_adamw(
            args.lr, args.lam, sparsity.default_group_axes, weight_decay=0.1, prox="euclidean"
        ),
        "prox_adamw(prox='adaptive')": sparsity.prox_adamw(
            args.lr, args.lam, sparsity.default_group_axes, weight_decay=0.1
        ),
    }
    configs = [(float(w), "none") for w in args.widths.split(",")]
    if args.heads == "nyu":
        configs.append((1.0, "nyu"))
    header = (
        "| width | heads | kernels | groups | params | "
        + " | ".join(f"{n} ms" for n in txs)
        + " | adaptive / adamw | Newton iters (median/max) |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for width, heads in configs:
        params = params_tree(width, heads)
        key = jax.random.PRNGKey(1)
        grads = jax.tree_util.tree_map(
            lambda p: 1e-3 * jax.random.normal(jax.random.fold_in(key, p.size), p.shape, p.dtype), params
        )
        grouped = sparsity.flatten_grouped(params, sparsity.default_group_axes)
        n_groups = sum(leaf.shape[axis] for _, leaf, axis in grouped)
        n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
        times = time_round_robin({name: compile_update(tx, params, grads) for name, tx in txs.items()}, args.repeats)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        # Ratio per round (same moment, same load), then the median over rounds.
        ratio = statistics.median(a / b for a, b in zip(times["prox_adamw(prox='adaptive')"], times["optax.adamw"]))
        iters = newton_iterations(params, grads, args.lr, args.lam)
        print(
            f"| {width:g} | {heads} | {len(grouped)} | {n_groups:,} | {n_params / 1e6:.1f}M | "
            + " | ".join(f"{v:.1f}" for v in ms.values())
            + f" | {ratio:.2f}× | {int(np.median(iters))}/{max(iters)} |",
            flush=True,
        )
        del params, grads


if __name__ == "__main__":
    main()
