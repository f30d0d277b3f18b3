"""Full zero-padded convolutions ("old") against the padding-aware ``models.conv.conv2d`` ("new"), side by side.

    python benchmarks/padding_conv.py                  # everything below
    python benchmarks/padding_conv.py --only rule,head --repeats 5

Parts (``--only``, comma-separated):

* ``rule``: one 3×3 dilated conv, forward + input and kernel gradients, computed three ways: ``full``
  (``lax.conv_general_dilated`` over the whole padded map), ``trimmed`` (dead taps dropped, one conv) and
  ``taps`` (per-tap products on the valid windows), for the backbone's and heads' dilated shapes; this is the
  measurement behind ``conv.TAPS_BELOW_VALID_FRACTION``.
* ``head``: one DeepLab head (rates 12/24/36), train mode, forward + gradients of parameters and input, at the
  demo size (8×8 map, batch 32, 256 → 32 channels, 6 outputs) and at the paper size (32×32, batch 2,
  2048 → 256, 40 outputs).
* ``train``: the whole jitted 3-task train step of ``configs/demo.py`` (ResNetD-50 at 1/8 width, 64×64,
  batch 32; model, losses, uncertainty weighting, prox-AdamW) on a synthetic in-memory batch.
* ``infer``: multi-task inference (eval mode, all heads): the dense Flax model at the demo size (batch 32, 64×64,
  1/8 width) and at the paper size (batch 1, 256×256, full width), and the compacted model
  (``compaction.compact`` of a random 50 % group sparsity) at the demo size. For the compact model, "new" also
  routes the compact backbone's convolutions through ``conv2d``.

"old" is traced inside ``conv.padding_aware(False)``, "new" with the default; both are compiled ahead of time and
then called alternately, each call ended by ``block_until_ready``, so that load from other work slows both alike.
The table has medians and the median of the per-round ratios old / new.
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

from mtl_sparse_jax import compaction, models  # noqa: E402
from mtl_sparse_jax.models import conv  # noqa: E402

PARTS = ("rule", "head", "train", "infer")
DEMO_TASKS = (("seg", "deeplab", 6), ("normals", "deeplab", 3), ("depth", "deeplab", 1))
PAPER_TASKS = (("seg", "deeplab", 40), ("normals", "deeplab", 3), ("depth", "deeplab", 1))


def compile_in_mode(fn, args, *, aware: bool):
    """``jit(fn).lower(*args).compile()`` traced with conv2d padding-aware or not (the model's convs and those of a
    compacted model alike); (compiled, seconds)."""
    start = time.perf_counter()
    with conv.padding_aware(aware):
        compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def time_pair(calls: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """ms per call of each zero-argument callable, alternating; each result blocked on."""
    for f in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(f())
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for k, f in calls.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            times[k].append((time.perf_counter() - t) * 1e3)
    return times


def row(name: str, times: dict[str, list[float]], note: str = "") -> dict:
    old, new = times["old"], times["new"]
    ratio = statistics.median(o / n for o, n in zip(old, new))
    r = {
        "name": name,
        "old_ms": statistics.median(old),
        "new_ms": statistics.median(new),
        "ratio": ratio,
        "repeats": len(old),
        "note": note,
    }
    print(
        f"{name:58s} old {r['old_ms']:10.1f} ms  new {r['new_ms']:9.1f} ms  old/new {ratio:6.2f}x  (n={len(old)}) {note}",
        flush=True,
    )
    return r


def max_rel_diff(a, b) -> float:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    err = max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in zip(la, lb))
    scale = max(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) for x in la)
    return err / max(scale, 1e-30)


# -- rule ---------------------------------------------------------------------------------------------------------

RULE_SHAPES = [  # (batch, h, w, C_in, C_out, rate): backbone layer3/layer4 and ASPP shapes, demo and paper
    (32, 8, 8, 32, 32, 2),
    (32, 8, 8, 64, 64, 4),
    (32, 8, 8, 256, 32, 2),
    (32, 8, 8, 256, 32, 4),
    (8, 16, 16, 64, 64, 2),
    (8, 16, 16, 64, 64, 4),
    (8, 16, 16, 64, 64, 8),
    (2, 32, 32, 256, 256, 2),
    (2, 32, 32, 512, 512, 4),
    (2, 32, 32, 2048, 256, 12),
    (2, 32, 32, 2048, 256, 24),
]


def bench_rule(repeats: int) -> list[dict]:
    out = []
    for b, h, w, cin, cout, rate in RULE_SHAPES:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(b, h, w, cin)), jnp.float32)
        k = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
        g = jnp.asarray(rng.normal(size=(b, h, w, cout)), jnp.float32)
        calls, compile_s = {}, {}
        for method in ("full", "trimmed", "taps"):

            def f(x, k, g, m=method):
                y, vjp = jax.vjp(lambda a, c: conv.conv2d(a, c, dilation=rate, padding=rate, method=m), x, k)
                return vjp(g)

            start = time.perf_counter()
            compiled = jax.jit(f).lower(x, k, g).compile()
            compile_s[method] = time.perf_counter() - start
            calls[method] = lambda c=compiled: c(x, k, g)
        reps = max(3, repeats // 3) if cin * cout >= 2048 * 256 else repeats
        times = time_pair(calls, reps)
        chosen, rows, cols = conv.choose_method(x.shape, k.shape, 1, rate, rate)
        n_taps = len(rows.live) * len(cols.live)
        frac = conv.valid_fraction(rows, cols)
        med = {m: statistics.median(t) for m, t in times.items()}
        r = {"shape": f"{b}×{h}×{w}, {cin}→{cout}, rate {rate}", "live_taps": n_taps, "fraction": frac, **med}
        r["auto"] = chosen
        print(
            f"rule {r['shape']:32s} live taps {n_taps} valid fraction {frac:.3f}: full {med['full']:8.1f}  "
            f"trimmed {med['trimmed']:8.1f}  taps {med['taps']:8.1f} ms -> auto {chosen}; compile s "
            + " / ".join(f"{compile_s[m]:.1f}" for m in ("full", "trimmed", "taps")),
            flush=True,
        )
        out.append(r)
    return out


# -- head ---------------------------------------------------------------------------------------------------------


def bench_head(name, batch, hw, cin, channels, outs, repeats) -> dict:
    head = models.DeepLabHead(outs, channels=channels)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, hw, hw, cin)), jnp.float32)
    variables = head.init(jax.random.key(0, impl="rbg"), x[:1], train=False)
    key = jax.random.PRNGKey(1)

    def fwd_bwd(params, stats, x, key):
        def loss(p, a):
            y, _ = head.apply(
                {"params": p, "batch_stats": stats}, a, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
            )
            return jnp.mean(jnp.square(y))

        return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

    args = (variables["params"], variables["batch_stats"], x, key)
    calls, compile_s, results = {}, {}, {}
    for mode, aware in (("old", False), ("new", True)):
        compiled, compile_s[mode] = compile_in_mode(fwd_bwd, args, aware=aware)
        calls[mode] = lambda c=compiled: c(*args)
        results[mode] = calls[mode]()
    diff = max_rel_diff(results["old"], results["new"])
    note = f"compile old {compile_s['old']:.1f} s / new {compile_s['new']:.1f} s; loss and grads rel. diff {diff:.1e}"
    return row(name, time_pair(calls, repeats), note)


# -- train step -------------------------------------------------------------------------------------------------


def bench_train(repeats: int) -> dict:
    from configs import demo
    from mtl_sparse_jax import benchmark, training

    config = demo.get_config()
    size = 64
    device = jax.devices()[0]
    calls, compile_s, states = {}, {}, {}
    for mode, aware in (("old", False), ("new", True)):
        with conv.padding_aware(aware):
            spec = training.step_spec(config, devices=[device])
            state = training.create_train_state(
                spec, (size, size), 0, learning_rate=config.optimizer.lr, lam=config.sparsity.lam
            )
            batch = training.put_batch(spec, benchmark.synthetic_batch(spec.task_map, config.batch_size, size))
            stats = training.init_train_stats(spec)
            rng = jax.random.PRNGKey(0)
            start = time.perf_counter()
            compiled = training.train_step.lower(spec, state, batch, rng, stats).compile()
            compile_s[mode] = time.perf_counter() - start
        holder = {"state": state}

        def step(c=compiled, h=holder, b=batch, r=rng, s=stats):
            h["state"], losses, _ = c(h["state"], b, r, s)
            return losses

        calls[mode] = step
        states[mode] = holder
    first = {m: calls[m]() for m in calls}  # same initial state and batch: the first losses must agree
    diff = max_rel_diff(first["old"], first["new"])
    times = time_pair(calls, repeats)
    note = (
        f"compile old {compile_s['old']:.1f} s / new {compile_s['new']:.1f} s; first-step losses rel. diff {diff:.1e}"
    )
    return row("demo 3-task train step (ResNetD-50 ×1/8, 64², batch 32)", times, note)


# -- inference --------------------------------------------------------------------------------------------------


def bench_infer_dense(name, tasks, width, size, batch, repeats) -> dict:
    model = models.MultiTaskModel(
        heads=[models.HeadSpec(*t) for t in tasks],
        depth=50,
        width_multiplier=width,
        head_width_multiplier=width,
        output_stride=8,
    )
    from mtl_sparse_jax import benchmark

    images = jax.random.uniform(jax.random.PRNGKey(0), (batch, size, size, 3))
    variables = benchmark.random_variables(model, images[:1])

    def fwd(v, x):
        return model.apply(v, x, train=False)

    calls, compile_s, outs = {}, {}, {}
    for mode, aware in (("old", False), ("new", True)):
        compiled, compile_s[mode] = compile_in_mode(fwd, (variables, images), aware=aware)
        calls[mode] = lambda c=compiled: c(variables, images)
        outs[mode] = calls[mode]()
    diff = max_rel_diff(outs["old"], outs["new"])
    note = f"compile old {compile_s['old']:.1f} s / new {compile_s['new']:.1f} s; outputs rel. diff {diff:.1e}"
    return row(name, time_pair(calls, repeats), note)


def bench_infer_compact(repeats: int) -> dict:
    from mtl_sparse_jax import benchmark

    setup = benchmark.random_setup(
        depth=50, width_multiplier=0.125, head_width_multiplier=0.125, size=64, sparsity=0.5, tasks=DEMO_TASKS
    )
    cm = compaction.compact(setup.params, setup.batch_stats, setup.model, input_size=(64, 64))
    images = jax.random.uniform(jax.random.PRNGKey(0), (32, 64, 64, 3))

    def fwd(p, x):
        return cm.apply(p, x, dtype=jnp.float32)

    calls, compile_s, outs = {}, {}, {}
    for mode, aware in (("old", False), ("new", True)):
        compiled, compile_s[mode] = compile_in_mode(fwd, (cm.params, images), aware=aware)
        calls[mode] = lambda c=compiled: c(cm.params, images)
        outs[mode] = calls[mode]()
    diff = max_rel_diff(outs["old"], outs["new"])
    note = f"compile old {compile_s['old']:.1f} s / new {compile_s['new']:.1f} s; outputs rel. diff {diff:.1e}"
    return row("compact multi-task inference, demo (50 % groups, 64², batch 32)", time_pair(calls, repeats), note)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts out of {','.join(PARTS)}")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds at the demo size")
    ap.add_argument("--paper-repeats", type=int, default=3, help="timed rounds at the paper size")
    ap.add_argument("--no-paper", action="store_true", help="skip the paper-size measurements (slow on a CPU)")
    args = ap.parse_args(argv)
    parts = [p for p in args.only.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"--only: unknown part(s) {bad}; choose from {','.join(PARTS)}")
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M %Z')}; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if "rule" in parts:
        bench_rule(args.repeats)
    if "head" in parts:
        bench_head("DeepLab head fwd+bwd, demo (8×8, batch 32, 256→32)", 32, 8, 256, 32, 6, args.repeats)
        if not args.no_paper:
            bench_head(
                "DeepLab head fwd+bwd, paper (32×32, batch 2, 2048→256)", 2, 32, 2048, 256, 40, args.paper_repeats
            )
    if "train" in parts:
        bench_train(args.repeats)
    if "infer" in parts:
        bench_infer_dense("dense multi-task inference, demo (64², batch 32)", DEMO_TASKS, 0.125, 64, 32, args.repeats)
        bench_infer_compact(args.repeats)
        if not args.no_paper:
            bench_infer_dense(
                "dense multi-task inference, paper (256², batch 1)", PAPER_TASKS, 1.0, 256, 1, args.paper_repeats
            )
    print(f"# done; load average {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
