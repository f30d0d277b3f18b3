"""Metrics of input-blind predictors on a dataset's test split: what "above chance" means for a results table.

  python benchmarks/chance_baseline.py --data data/synthetic --tasks seg,normals,depth --num-classes 6

Each task gets the best constant prediction fitted on the train split: segmentation the most frequent class,
depth the mean (normalised) target, normals the mean valid normal direction. The metrics are computed with the
same task code and the same pipeline as training, at the model's output stride (8).
"""

import argparse
import json

import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--tasks", default="seg,normals,depth")
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--depth-norm", default="fixed")
    p.add_argument("--stride", type=int, default=8)
    args = p.parse_args()

    import jax.numpy as jnp

    from mtl_sparse_jax import tasks as tasks_lib
    from mtl_sparse_jax.data import pipeline as input_pipeline

    names = tuple(args.tasks.split(","))
    tasks = {n: tasks_lib.get_task(n, **({"num_classes": args.num_classes} if n == "seg" else {})) for n in names}
    kw = dict(tasks=names, batch_size=32, depth_norm=args.depth_norm)

    # Fit the constants on the train split.
    counts = np.zeros(args.num_classes)
    depth_sum = depth_n = 0.0
    normal_sum = np.zeros(3)
    for b in input_pipeline.iterate_batches(args.data, "train", train=False, **kw):
        w = b["weight"] > 0
        if "seg" in names:
            s = b["seg"][w]
            counts += np.bincount(s[s != 255].ravel(), minlength=256)[: args.num_classes]
        if "depth" in names:
            v = b["depth_valid"][w] > 0
            depth_sum += float(b["depth"][w][v].sum())
            depth_n += float(v.sum())
        if "normals" in names:
            n = b["normals"][w].reshape(-1, 3)
            normal_sum += n[np.abs(n).sum(-1) > 0].sum(0)
    const = {
        "seg": int(counts.argmax()),
        "depth": depth_sum / max(depth_n, 1.0),
        "normals": normal_sum / max(np.linalg.norm(normal_sum), 1e-12),
    }

    stats = {n: t.init_stats() for n, t in tasks.items()}
    for b in input_pipeline.iterate_batches(args.data, "test", train=False, **kw):
        bsz, h, w_ = b["image"].shape[:3]
        hf, wf = h // args.stride, w_ // args.stride
        batch = {k: jnp.asarray(v) for k, v in b.items()}
        for n, t in tasks.items():
            if n == "seg":
                raw = jnp.zeros((bsz, hf, wf, t.out_channels)).at[..., const["seg"]].set(10.0)
            elif n == "depth":
                d = np.clip(const["depth"], 1e-4, 1 - 1e-4)
                raw = jnp.full((bsz, hf, wf, 1), np.log(d / (1 - d)))
            elif n == "normals":
                raw = jnp.broadcast_to(jnp.asarray(0.01 * const["normals"], jnp.float32), (bsz, hf, wf, 3))
            else:
                raise SystemExit(f"no constant predictor for task {n!r}")
            stats[n] = t.update_stats(stats[n], raw, batch)
    out = {}
    for n, t in tasks.items():
        out.update({k: round(float(v), 4) for k, v in t.finalize(stats[n]).items() if not k.endswith("/loss")})
    print(
        json.dumps(
            {"constants": {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in const.items()}, "metrics": out},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
