"""``sharpscope compare A.pt B.pt --out DIR``: two minima, numbers and pictures, one report."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from ..compare import compare_checkpoints
from ..devices import resolve_device
from ..directions import NORMALIZATIONS
from ..errors import SharpscopeError
from ..settings import DEFAULT_DRAWS, QUICK, SPLITS, CompareSettings
from .common import (
    add_checkpoint_arguments,
    add_device_argument,
    loading_from_args,
    seed_type,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="measure two checkpoints and draw their landscapes side by side, with a report",
        description="For checkpoints A and B of one architecture: the measure table "
        "(loss, accuracy, worst-case sharpness, Hessian eigenvalue and trace), the "
        "interpolation L((1-t) w_A + t w_B), 1-D curves along one random direction "
        "overlaid and 2-D surfaces side by side with a shared color scale (the same "
        "Gaussian directions for both, each filter-normalized against its own model). "
        "Writes DIR/report.md (the figures and the table), DIR/results.json (every "
        "number with its settings), the surfaces (.npz) and the figures (PDF and PNG).",
    )
    p.add_argument("checkpoint_a", metavar="A.pt", nargs="?")
    p.add_argument("checkpoint_b", metavar="B.pt", nargs="?")
    p.add_argument(
        "--a",
        nargs="+",
        metavar="A.pt",
        help="group A: several checkpoints (e.g. one per seed: --a runs/sgd-*/checkpoint.pt) "
        "instead of A.pt; numbers are then reported as mean ± standard error with Welch's "
        "test of the difference",
    )
    p.add_argument("--b", nargs="+", metavar="B.pt", help="group B (see --a)")
    p.add_argument(
        "--draws",
        type=int,
        help=f"direction draws for the 1-D curves and coarse 2-D surfaces of every checkpoint "
        f"(default: 1 for two checkpoints, {DEFAULT_DRAWS} for groups)",
    )
    add_compare_arguments(p)
    add_checkpoint_arguments(p)
    p.set_defaults(func=run)


def add_compare_arguments(
    p: argparse.ArgumentParser, out_default: str | None = None, samples: int | None = None
) -> None:
    """The options ``compare`` and ``demo`` share; ``samples`` replaces the default number
    of examples (without --quick)."""
    d = CompareSettings()
    samples = d.samples if samples is None else samples
    p.set_defaults(default_samples=samples)
    if out_default is None:
        p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
        p.add_argument("--labels", nargs=2, metavar=("A", "B"), help="names for A and B")
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="write into a folder that is not empty, replacing an earlier compare's files",
        )
    else:
        p.add_argument("--out", default=out_default, metavar="DIR", help="(default: %(default)s)")
    p.add_argument(
        "--points",
        type=int,
        help=f"1-D and interpolation points (default: {d.points}; --quick: {QUICK['points']})",
    )
    p.add_argument(
        "--points-2d",
        type=int,
        help=f"2-D points per axis (default: {d.points_2d}, Li et al. 2018; --quick: "
        f"{QUICK['points_2d']})",
    )
    p.add_argument(
        "--samples",
        type=int,
        help=f"examples every number and surface is computed on (default: {samples}; "
        f"--quick: {QUICK['samples']})",
    )
    p.add_argument(
        "--trace-samples",
        type=int,
        help=f"Hutchinson probes for the Hessian trace (default: {d.trace_samples}; "
        f"--quick: {QUICK['trace_samples']})",
    )
    p.add_argument(
        "--draw-points-2d",
        type=int,
        default=d.draw_points_2d,
        metavar="N",
        help=f"points per axis of the 2-D surfaces drawn for the statistics over direction "
        f"draws; 0 for none (default: {d.draw_points_2d})",
    )
    p.add_argument(
        "--quick", action="store_true", help="coarse grids and few examples: a look in seconds"
    )
    p.add_argument(
        "--range",
        type=float,
        nargs=2,
        default=list(d.range),
        metavar=("LOW", "HIGH"),
        help="1-D and 2-D coordinate range (default: -1 1, Li et al. 2018)",
    )
    p.add_argument(
        "--directions",
        choices=NORMALIZATIONS,
        default=d.directions,
        help="normalization of the Gaussian directions (default: filter, Li et al. 2018)",
    )
    p.add_argument("--split", choices=SPLITS, default=d.split, help=f"(default: {d.split})")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"(default: {d.batch_size})"
    )
    p.add_argument(
        "--seed", type=seed_type, default=d.seed, help="directions and examples (default: 0)"
    )
    p.add_argument(
        "--no-measure", action="store_true", help="skip the measure table (landscapes only)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_device_argument(p)


def compare_settings(args: argparse.Namespace) -> CompareSettings:
    """The :class:`CompareSettings` the shared options give, --quick filling in what
    was not given; checked before any work."""
    quick = QUICK if args.quick else {}
    d = CompareSettings()

    def pick(name: str, default: int | None) -> int | None:
        value = getattr(args, name)
        return value if value is not None else quick.get(name, default)

    return CompareSettings(
        points=pick("points", d.points),
        points_2d=pick("points_2d", d.points_2d),
        samples=pick("samples", args.default_samples),
        trace_samples=pick("trace_samples", d.trace_samples),
        range=tuple(args.range),
        directions=args.directions,
        split=args.split,
        batch_size=args.batch_size,
        seed=args.seed,
        measure=not args.no_measure,
        draw_points_2d=args.draw_points_2d,
    )


def run_options(args: argparse.Namespace) -> dict:
    """Where and how loudly: device, progress bars, the log of steps."""
    return {
        "device": resolve_device(args.device),
        "progress": not args.quiet and sys.stderr.isatty(),
        "log": None if args.quiet else (lambda message: print(message, flush=True)),
    }


def _groups(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The two sides: A.pt B.pt, or --a ... --b ... (one way, not both)."""
    pair = [args.checkpoint_a, args.checkpoint_b]
    if args.a is None and args.b is None:
        if None in pair:
            raise SharpscopeError("compare needs A.pt B.pt, or groups --a ... --b ...")
        return [pair[0]], [pair[1]]
    if args.a is None or args.b is None or pair != [None, None]:
        raise SharpscopeError("give both groups with --a and --b, and no A.pt B.pt besides")
    return args.a, args.b


def run(args: argparse.Namespace) -> int:
    group_a, group_b = _groups(args)
    grouped = len(group_a) > 1 or len(group_b) > 1
    draws = args.draws if args.draws is not None else DEFAULT_DRAWS if grouped else 1
    compare_checkpoints(
        group_a,
        group_b,
        args.out,
        dataclasses.replace(compare_settings(args), draws=draws),
        labels=tuple(args.labels) if args.labels else None,
        overwrite=args.overwrite,
        **run_options(args),
        **loading_from_args(args),
    )
    print(f"wrote {os.path.join(args.out, 'report.md')}")
    return 0
