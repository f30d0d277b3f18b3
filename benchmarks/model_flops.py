"""FLOPs per image of the paper's network: XLA's cost analysis of the compiled forward and forward+backward,
next to an analytic count of the convolutions.

    python benchmarks/model_flops.py [--size 256 --batch 1 --depth 50 --heads 40,3,1 --output-stride 8]
                                     [--run] [--json /tmp/model_flops.json]

Default: ResNetD-50 (output stride 8) with three DeepLab heads of 40, 3 and 1 outputs at 256×256. Nothing needs
real weights: the functions are lowered and compiled from abstract shapes. ``--run`` also executes one jitted
forward+backward on random weights and reports its wall time (compile excluded). Prints a markdown table.

Analytic count: 2·(multiply-adds) of every conv, from the conv input/output shapes recorded during an abstract
forward pass; the backward of a conv costs two forward convs (input and weight gradients), except that the
first conv needs no input gradient. It is given twice: counting every kernel tap (as PyTorch FLOP counters
do), and counting only taps that land inside the input map. XLA's cost analysis skips taps that read zero
padding, so it matches the second count plus BN, ReLU, pooling and the BN-statistics arithmetic. The gap
between the two is the heavily dilated ASPP branches: at a 32×32 feature map, the rate-36 branch's off-centre
taps all read padding.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtl_sparse_jax.models import Conv2d, HeadSpec, MultiTaskModel


def valid_taps_1d(size_in, size_out, kernel_size, stride, dilation):
    """Number of (output position, kernel tap) pairs along one axis whose input index is inside the map."""
    pad = dilation * (kernel_size - 1) // 2
    index = np.arange(size_out)[:, None] * stride + np.arange(kernel_size)[None, :] * dilation - pad
    return int(((index >= 0) & (index < size_in)).sum())


def conv_macs(model, variables, x_shape):
    """{module path: (multiply-adds, multiply-adds on taps inside the map)} of every conv in a forward pass.

    The first counts every kernel tap, as PyTorch-style counters do; the second skips taps that read the zero
    padding, which is what XLA's cost analysis counts (it matters for the dilated ASPP branches).
    """
    macs = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        m = context.module
        if isinstance(m, Conv2d) and context.method_name == "__call__":
            b, h, w, cin = args[0].shape
            _, ho, wo, cout = out.shape
            k = m.kernel_size
            dense = b * ho * wo * k * k * cin * cout
            valid_h = valid_taps_1d(h, ho, k, m.stride, m.dilation)
            valid_w = valid_taps_1d(w, wo, k, m.stride, m.dilation)
            macs["/".join(m.scope.path)] = (dense, b * valid_h * valid_w * cin * cout)
        return out

    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    return macs


def xla_flops(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]), compiled


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--heads", default="40,3,1", help="output channels of the DeepLab heads, comma-separated")
    parser.add_argument("--output-stride", type=int, default=8)
    parser.add_argument("--width", type=float, default=1.0, help="backbone width multiplier")
    parser.add_argument("--run", action="store_true", help="also time one jitted forward+backward")
    parser.add_argument("--json", default="", help="write the numbers to this JSON file as well")
    args = parser.parse_args(argv)

    try:
        outs = [int(c) for c in args.heads.split(",") if c]
    except ValueError:
        parser.error(f"--heads must be comma-separated integers like 40,3,1, got {args.heads!r}")
    heads = [HeadSpec(f"task{i}", "deeplab", c) for i, c in enumerate(outs)]
    model = MultiTaskModel(heads, depth=args.depth, width_multiplier=args.width, output_stride=args.output_stride)
    x_shape = (args.batch, args.size, args.size, 3)
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)

    def forward_eval(v, x):
        return model.apply(v, x, train=False)

    def loss_train(params, batch_stats, x, rng):
        out, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats"],
        )
        return sum(jnp.mean(jnp.square(o)) for o in out.values()), updates

    def forward_backward(params, batch_stats, x, rng):
        return jax.value_and_grad(loss_train, has_aux=True)(params, batch_stats, x, rng)

    t0 = time.perf_counter()
    fwd_flops, _ = xla_flops(forward_eval, variables, x)
    fwd_train_flops, _ = xla_flops(
        lambda p, b, x, r: loss_train(p, b, x, r), variables["params"], variables["batch_stats"], x, rng
    )
    fwdbwd_flops, fwdbwd = xla_flops(forward_backward, variables["params"], variables["batch_stats"], x, rng)
    compile_s = time.perf_counter() - t0

    macs = conv_macs(model, variables, x_shape)
    backbone_fwd = 2 * sum(v[0] for k, v in macs.items() if k.startswith("backbone/"))
    heads_fwd = 2 * sum(v[0] for k, v in macs.items() if not k.startswith("backbone/"))
    conv_fwd = backbone_fwd + heads_fwd
    conv_fwdbwd = 3 * conv_fwd - 2 * macs["backbone/stem_conv1"][0]
    valid_backbone_fwd = 2 * sum(v[1] for k, v in macs.items() if k.startswith("backbone/"))
    valid_fwd = 2 * sum(v[1] for v in macs.values())
    valid_fwdbwd = 3 * valid_fwd - 2 * macs["backbone/stem_conv1"][1]
    n_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))

    result = {
        "model": f"ResNetD-{args.depth} (width {args.width}, output stride {args.output_stride}) + DeepLab heads {outs}",
        "input": list(x_shape),
        "params": n_params,
        "xla_forward_eval_gflops_per_image": fwd_flops / args.batch / 1e9,
        "xla_forward_train_gflops_per_image": fwd_train_flops / args.batch / 1e9,
        "xla_forward_backward_gflops_per_image": fwdbwd_flops / args.batch / 1e9,
        "analytic_conv_forward_gflops_per_image": conv_fwd / args.batch / 1e9,
        "analytic_conv_forward_backbone_gflops_per_image": backbone_fwd / args.batch / 1e9,
        "analytic_conv_forward_heads_gflops_per_image": heads_fwd / args.batch / 1e9,
        "analytic_conv_forward_backward_gflops_per_image": conv_fwdbwd / args.batch / 1e9,
        "analytic_conv_forward_inside_map_gflops_per_image": valid_fwd / args.batch / 1e9,
        "analytic_conv_forward_inside_map_backbone_gflops_per_image": valid_backbone_fwd / args.batch / 1e9,
        "analytic_conv_forward_inside_map_heads_gflops_per_image": (valid_fwd - valid_backbone_fwd) / args.batch / 1e9,
        "analytic_conv_forward_backward_inside_map_gflops_per_image": valid_fwdbwd / args.batch / 1e9,
        "compile_s": compile_s,
        "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": datetime.date.today().isoformat(),
    }

    if args.run:
        nprng = np.random.default_rng(0)

        def fill(path, leaf):
            if path[-1].key == "var":
                return np.ones(leaf.shape, np.float32)
            if path[-1].key in ("mean", "bias") or path[-1].key == "scale":
                return (np.ones if path[-1].key == "scale" else np.zeros)(leaf.shape, np.float32)
            bound = 1 / np.sqrt(np.prod(leaf.shape[:-1]))
            return nprng.uniform(-bound, bound, leaf.shape).astype(np.float32)

        real = jax.tree_util.tree_map_with_path(fill, variables)
        image = nprng.uniform(size=x_shape).astype(np.float32)
        key = jax.random.key(1)
        (loss, _), grads = fwdbwd(real["params"], real["batch_stats"], image, key)  # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            (loss, _), grads = fwdbwd(real["params"], real["batch_stats"], image, key)
            jax.block_until_ready(grads)
            times.append(time.perf_counter() - t0)
        result["forward_backward_s_median_of_3"] = float(np.median(times))
        result["grads_finite"] = bool(all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads)))

    rows = [
        ("XLA cost analysis, forward (eval)", result["xla_forward_eval_gflops_per_image"]),
        ("XLA cost analysis, forward (train: batch statistics)", result["xla_forward_train_gflops_per_image"]),
        ("XLA cost analysis, forward + backward", result["xla_forward_backward_gflops_per_image"]),
        ("analytic convs, forward: backbone", result["analytic_conv_forward_backbone_gflops_per_image"]),
        ("analytic convs, forward: heads", result["analytic_conv_forward_heads_gflops_per_image"]),
        ("analytic convs, forward: total", result["analytic_conv_forward_gflops_per_image"]),
        ("analytic convs, forward + backward", result["analytic_conv_forward_backward_gflops_per_image"]),
        (
            "analytic convs, taps inside the map only, forward: backbone",
            result["analytic_conv_forward_inside_map_backbone_gflops_per_image"],
        ),
        (
            "analytic convs, taps inside the map only, forward: heads",
            result["analytic_conv_forward_inside_map_heads_gflops_per_image"],
        ),
        (
            "analytic convs, taps inside the map only, forward: total",
            result["analytic_conv_forward_inside_map_gflops_per_image"],
        ),
        (
            "analytic convs, taps inside the map only, forward + backward",
            result["analytic_conv_forward_backward_inside_map_gflops_per_image"],
        ),
    ]
    print(f"{result['model']}, input {x_shape}, {n_params:,} params")
    print("| measurement | GFLOPs per image |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.2f} |")
    if args.run:
        print(
            f"forward+backward wall time (median of 3, batch {args.batch}): {result['forward_backward_s_median_of_3']:.2f} s;"
            f" grads finite: {result['grads_finite']}"
        )

    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
            json.dump(result, f, indent=1)
        os.replace(f.name, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
