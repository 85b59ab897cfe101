"""``sharpscope landscape``: 1-D / 2-D surfaces of one checkpoint, or A -> B interpolation."""

from __future__ import annotations

import argparse
import os
import sys

from .. import distributed
from ..errors import SharpscopeError
from ..landscape import (
    DEFAULT_POINTS,
    DEFAULT_RANGE,
    DIRECTIONS,
    INTERPOLATION_RANGE,
    interpolation_for_checkpoints,
    landscape_for_checkpoint,
)
from .common import add_device_argument, add_evaluation_arguments, check_output_path, resolve_device


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "landscape",
        help="loss surfaces along directions, or the interpolation between two checkpoints",
        description="With one checkpoint: L(w + a d1) (--dim 1) or L(w + a d1 + b d2) "
        "(--dim 2) along filter-normalized Gaussian directions (Li et al. 2018) or the "
        "other --directions. With two: L((1 - t) w_A + t w_B) (Goodfellow et al. 2015). "
        "Saves an .npz (coordinates, loss, accuracy, settings as JSON) for "
        "`sharpscope plot`. An interrupted 2-D grid continues with --resume.",
    )
    p.add_argument(
        "checkpoints", nargs="+", metavar="CHECKPOINT", help="one, or two to interpolate"
    )
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--dim", type=int, choices=(1, 2), default=1, help="(default: 1)")
    p.add_argument(
        "--points",
        type=int,
        nargs="+",
        default=[DEFAULT_POINTS],
        help="points per axis, or NX NY for a non-square grid (default: 51, Li et al. 2018)",
    )
    p.add_argument(
        "--range",
        nargs="+",
        default=None,
        metavar="LOW HIGH",
        help="coordinate range, or 'auto' to widen until the edge loss is 10x the "
        "centre's (default: -1 1; interpolation: -0.5 1.5)",
    )
    p.add_argument(
        "--directions",
        choices=DIRECTIONS,
        default="filter",
        help="filter (default), layer or none normalization of Gaussian directions; "
        "hessian (top eigenvectors); pca (principal components of --trajectory)",
    )
    p.add_argument(
        "--trajectory",
        metavar="RUN_DIR",
        help="run folder with trajectory/ checkpoints (train --save-every) for pca",
    )
    p.add_argument("--seed", type=int, default=0, help="directions and examples (default: 0)")
    p.add_argument(
        "--orthogonalize",
        action="store_true",
        help="make d2 orthogonal to d1 (after normalization)",
    )
    p.add_argument(
        "--include-1d", action="store_true", help="perturb biases and normalization parameters too"
    )
    p.add_argument(
        "--bn-recalibrate",
        action="store_true",
        help="recompute BatchNorm statistics on training data at every point",
    )
    p.add_argument(
        "--include-buffers",
        action="store_true",
        help="interpolation: interpolate BatchNorm statistics too",
    )
    p.add_argument("--save-directions", action="store_true", help="store d1, d2 in the .npz")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted 2-D grid from OUT.partial.npz",
    )
    p.add_argument("--label", help="legend label (default: the optimizer, from the checkpoint)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_evaluation_arguments(p)
    add_device_argument(p)
    p.set_defaults(func=run)


def _range(values: list[str] | None, default: tuple[float, float]):
    if values is None:
        return default
    if values == ["auto"]:
        return "auto"
    if len(values) != 2:
        raise SharpscopeError("--range takes two numbers LOW HIGH, or auto")
    try:
        low, high = float(values[0]), float(values[1])
    except ValueError:
        raise SharpscopeError(f"--range: not numbers: {' '.join(values)}") from None
    if not low < high:
        raise SharpscopeError(f"--range: LOW must be below HIGH, got {low} {high}")
    return low, high


def run(args: argparse.Namespace) -> int:
    check_output_path(args.out)
    if not args.out.endswith(".npz"):
        raise SharpscopeError(f"--out must end in .npz, got {args.out}")
    if len(args.checkpoints) > 2:
        raise SharpscopeError("give one checkpoint (surfaces) or two (interpolation)")
    for path in args.checkpoints:
        if not os.path.isfile(path):
            raise SharpscopeError(f"{path}: no such file")
    if any(n < 1 for n in args.points) or len(args.points) > 2:
        raise SharpscopeError("--points takes one or two positive numbers")
    if args.samples is not None and args.samples <= 0:
        raise SharpscopeError(f"--samples must be positive, got {args.samples}")
    device = distributed.init_from_environment(resolve_device(args.device))
    progress = not args.quiet and sys.stderr.isatty() and distributed.is_main_process()
    if len(args.checkpoints) == 2:
        rng = _range(args.range, INTERPOLATION_RANGE)
        if rng == "auto":
            raise SharpscopeError("--range auto applies to directions, not interpolation")
        surface = interpolation_for_checkpoints(
            *args.checkpoints,
            points=args.points[0],
            range=rng,
            include_buffers=args.include_buffers,
            split=args.split,
            samples=args.samples,
            batch_size=args.batch_size,
            device=device,
            seed=args.seed,
            progress=progress,
        )
    else:
        partial = args.out + ".partial.npz"
        if not args.resume and os.path.exists(partial) and distributed.is_main_process():
            os.remove(partial)  # not resuming: the grid starts over
        surface = _surface(args, device, progress, partial)
    if distributed.is_main_process():
        surface.save(args.out)
        finite = surface.loss[surface.loss == surface.loss]
        print(
            f"wrote {args.out}: {surface.kind} landscape, {surface.loss.size} points, "
            f"loss {finite.min():.4g} to {finite.max():.4g}"
        )
    return 0


def _surface(args: argparse.Namespace, device, progress: bool, partial: str):
    points = args.points[0] if len(args.points) == 1 else tuple(args.points)
    return landscape_for_checkpoint(
        args.checkpoints[0],
        dim=args.dim,
        points=points,
        range=_range(args.range, DEFAULT_RANGE),
        directions=args.directions,
        seed=args.seed,
        orthogonalize_d2=args.orthogonalize,
        include_1d=args.include_1d,
        split=args.split,
        samples=args.samples,
        batch_size=args.batch_size,
        device=device,
        bn_recalibrate=args.bn_recalibrate,
        trajectory=args.trajectory,
        resume_path=partial if distributed.is_main_process() else None,
        save_directions=args.save_directions,
        label=args.label,
        progress=progress,
    )
