"""Command line for sweeps: run every cell of a sweep file, one cell, or emit a SLURM job array; write the report.

python -m mtl_sparse_jax.sweep --sweep configs/sweeps/demo.py --workdir runs/sweep_demo [--override.num_epochs=3]
python -m mtl_sparse_jax.sweep --sweep ... --workdir ... --dry-run            # cells and their state
python -m mtl_sparse_jax.sweep --sweep ... --workdir ... --only 'seg__*'      # a glob or substring of names
python -m mtl_sparse_jax.sweep --sweep ... --workdir ... --cell 3             # one cell (any scheduler)
python -m mtl_sparse_jax.sweep --sweep ... --workdir ... --emit slurm --partition gpu --gpus-per-task 1
python -m mtl_sparse_jax.sweep --sweep ... --workdir ... --report [--no-bench]

Exit status: 0 when every selected cell finished, 1 when a cell failed (the others still ran), 2 on bad input
(nothing is written then).
"""

from __future__ import annotations

import argparse
import os
import sys

from mtl_sparse_jax import cli

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        _fail(f"{message}; see python -m mtl_sparse_jax.sweep --help")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    parser = _Parser(prog="python -m mtl_sparse_jax.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", required=True, help="sweep file defining get_sweep(), e.g. configs/sweeps/demo.py")
    parser.add_argument("--workdir", required=True, help="one subdirectory per cell, plus sweep.json and the report")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their state; run nothing")
    parser.add_argument("--only", help="run the cells whose name matches this glob or contains this text")
    parser.add_argument("--cell", type=int, help="run only cell K (0-based, as --dry-run lists them)")
    parser.add_argument("--report", action="store_true", help="only write summary.json, tables/ and figures/")
    parser.add_argument("--no-bench", action="store_true", help="skip the latency figure (no timing runs)")
    parser.add_argument("--bench-repeats", type=int, default=10, help="timed calls per model for the latency figure")
    parser.add_argument("--emit", choices=["slurm"], help="write WORKDIR/sweep.sbatch (a job array) and exit")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--gpus-per-task", type=int, help="SLURM --gpus-per-task")
    parser.add_argument("--cpus-per-task", type=int, help="SLURM --cpus-per-task")
    parser.add_argument("--mem", help="SLURM --mem, e.g. 64G")
    parser.add_argument("--time", help="SLURM --time, e.g. 24:00:00")
    parser.add_argument("--max-parallel", type=int, help="at most this many array tasks at once (%%N)")
    parser.add_argument("--sbatch-arg", action="append", default=[], help="extra '#SBATCH' line, e.g. --account=x")
    overrides, rest = {}, []
    from mtl_sparse_jax.experiments import sweep as sweep_lib

    for arg in argv:
        if arg.startswith("--override."):
            key, sep, value = arg[len("--override.") :].partition("=")
            if not sep or not key:
                _fail(f"{arg!r} is not --override.KEY=VALUE, e.g. --override.num_epochs=3")
            overrides[key] = sweep_lib.parse_override_value(value)
        else:
            rest.append(arg)
    args = parser.parse_args(rest)
    if args.emit and (args.dry_run or args.report):
        _fail("--emit slurm writes the job script only; drop --dry-run / --report")
    if args.bench_repeats < 1:
        _fail(f"--bench-repeats must be >= 1, got {args.bench_repeats}")
    return args, overrides


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, overrides = parse_args(argv)
    from mtl_sparse_jax.experiments import sweep as sweep_lib

    try:
        sweep = sweep_lib.load_sweep(args.sweep, overrides)
        cells = sweep.select(only=args.only, cell=args.cell)
    except sweep_lib.SweepError as e:
        _fail(str(e))
    workdir = args.workdir

    if args.dry_run:
        print("\n".join(sweep_lib.dry_run_lines(sweep, workdir, cells)))
        return 0
    if args.emit == "slurm":
        script = sweep_lib.slurm_script(
            sweep,
            workdir,
            cells,
            partition=args.partition,
            gpus_per_task=args.gpus_per_task,
            cpus_per_task=args.cpus_per_task,
            mem=args.mem,
            time_limit=args.time,
            max_parallel=args.max_parallel,
            sbatch_args=args.sbatch_arg,
        )
        os.makedirs(os.path.join(workdir, "slurm"), exist_ok=True)
        path = os.path.join(workdir, "sweep.sbatch")
        sweep_lib.write_text_atomic(path, script)
        sweep_lib.write_sweep_json(sweep, workdir)
        print(f"wrote {path} ({len(cells)} array tasks); submit with: sbatch {path}")
        print(f"afterwards: python -m mtl_sparse_jax.sweep --sweep {args.sweep} --workdir {workdir} --report")
        return 0

    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/mtl_sparse_jax/xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    from mtl_sparse_jax.experiments import figures

    failed = []
    if not args.report:
        prepared = set()
        for cell in cells:  # the demo data, generated on first use as `main` does (data.generate_if_missing)
            if cell.config.data.dir not in prepared:
                cli.prepare_demo_data(cell.config)
                prepared.add(cell.config.data.dir)
        failed = sweep_lib.run_cells(sweep, workdir, cells)
    if args.report or args.cell is None:
        os.makedirs(workdir, exist_ok=True)
        sweep_lib.write_sweep_json(sweep, workdir)
        figures.write_report(sweep, workdir, bench=not args.no_bench, repeats=args.bench_repeats)
    elif not failed:
        print(
            f"cell {args.cell} finished; when every cell has: python -m mtl_sparse_jax.sweep --sweep {args.sweep} "
            f"--workdir {workdir} --report"
        )
    if failed:
        print(
            f"error: {len(failed)} cell(s) failed: " + ", ".join(f"[{c.index}] {c.name}" for c in failed),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
