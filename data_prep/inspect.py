"""Write one example of a converted dataset exactly as the training pipeline yields it, for a person to check.

    python -m data_prep.inspect --data DIR --split S --index I --out FILE.npz [--png FILE.png]
                                [--tasks seg,depth,...] [--depth-norm reference|fixed|none] [--depth-max-m M]

The example is read with `mtl_sparse_jax.data.pipeline.iterate_batches` (evaluation order, batch 1, this
process alone), so what lands in the npz is what the model is trained and evaluated on: 'image' float32
[H,W,3] in [0,1] and one array per task named by task ('seg' int32 [H,W] with 255 = ignore, 'depth' float32
[H,W,1] normalised, 'normals', 'edge', attributes as float32 scalars), plus 'depth_valid' and 'depth_scale' when
depth is present and 'id'. --png also saves a contact sheet of all of them.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np

from mtl_sparse_jax import cli, fileio
from mtl_sparse_jax.data import spec as data_spec


def load_example(
    data_dir: str, split: str, index: int, *, tasks=None, depth_norm: str = "reference", depth_max_m: float = 10.0
) -> dict[str, np.ndarray]:
    """Example `index` (0-based, manifest order) of `split`, as the pipeline yields it, without the batch axis."""
    from mtl_sparse_jax.data import pipeline as input_pipeline

    manifest = data_spec.load_manifest(data_dir, verify="none")
    total = data_spec.split_entry(manifest, split, data_dir)["num_examples"]
    if not 0 <= index < total:
        raise ValueError(
            f"--index {index} is out of range: split '{split}' of {data_dir} has {total} examples (0..{total - 1})"
        )
    tasks = list(tasks) if tasks else data_spec.available_tasks(manifest["features"])
    batches = input_pipeline.iterate_batches(
        data_dir,
        split,
        tasks=tasks,
        batch_size=1,
        train=False,
        depth_norm=depth_norm,
        depth_max_m=depth_max_m,
        process_index=0,
        process_count=1,
        cache=False,
        prefetch=0,
        with_ids=True,
    )
    batch = next(itertools.islice(batches, index, None))
    example = {}
    for key, value in batch.items():
        if key == "weight":
            continue
        value = np.asarray(value)[0]
        example[key] = np.asarray(value.decode()) if key == "id" else value
    return example


def save_npz(path: str, example: dict[str, np.ndarray]) -> None:
    with fileio.atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **example)


def save_contact_sheet(path: str, example: dict[str, np.ndarray], title: str = "") -> None:
    """One panel per dense array (image, seg, depth, normals, edge), attributes in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in ("image", "seg", "depth", "depth_valid", "normals", "edge") if name in example]
    attributes = [f"{name}={float(example[name]):g}" for name in data_spec.ATTRIBUTE_FEATURES if name in example]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, name in zip(axes[0], panels):
        value = example[name]
        if name == "seg":
            seg = np.ma.masked_equal(value, data_spec.IGNORE_LABEL)
            shown = ax.imshow(seg, cmap="tab20", interpolation="nearest")
            ax.set_title("seg (white = ignore)")
            fig.colorbar(shown, ax=ax, fraction=0.046)
        elif name == "normals":
            invalid = np.all(value == 0, axis=-1)
            rgb = np.clip((value + 1.0) / 2.0, 0, 1)
            rgb[invalid] = 0.0
            ax.imshow(rgb, interpolation="nearest")
            ax.set_title("normals ((n+1)/2, black = invalid)")
        elif name == "image":
            ax.imshow(np.clip(value, 0, 1), interpolation="nearest")
            ax.set_title("image")
        else:
            limits = {"vmin": 0.0, "vmax": 1.0} if name == "depth_valid" else {}
            shown = ax.imshow(
                value[..., 0] if value.ndim == 3 else value, cmap="viridis", interpolation="nearest", **limits
            )
            label = name
            if name == "depth" and "depth_scale" in example:
                label += f" (× {float(example['depth_scale']):.3g} m)"
            ax.set_title(label)
            fig.colorbar(shown, ax=ax, fraction=0.046)
        ax.set_axis_off()
    fig.suptitle(" ".join(filter(None, [title] + attributes)))
    fig.tight_layout()
    with fileio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    """The command line; every error ends as one `error:` line and exit code 2 (see mtl_sparse_jax.cli)."""
    return cli.run(_main, argv)


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="converted dataset folder (holds manifest.json)")
    parser.add_argument("--split", required=True)
    parser.add_argument("--index", type=int, required=True, help="0-based position in the split (manifest order)")
    parser.add_argument("--out", required=True, help="npz file to write")
    parser.add_argument("--png", help="also save a contact sheet here")
    parser.add_argument("--tasks", help="comma-separated tasks (default: every task the dataset has)")
    parser.add_argument("--depth-norm", default="reference", help="reference | fixed | none (as in training)")
    parser.add_argument("--depth-max-m", type=float, default=10.0, help="metres per unit for --depth-norm fixed")
    parser.add_argument("--debug", action="store_true", help=cli.DEBUG_HELP)
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    example = load_example(
        args.data, args.split, args.index, tasks=tasks, depth_norm=args.depth_norm, depth_max_m=args.depth_max_m
    )
    save_npz(args.out, example)
    if args.png:
        save_contact_sheet(args.png, example, title=f"{args.split}[{args.index}] id={example['id']}")
    shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in example.items() if k != "id")
    print(f"[inspect] {args.out}: id {example['id']}: {shapes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
