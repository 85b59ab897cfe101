"""``sharpscope landscape``: 1-D / 2-D surfaces of one checkpoint, or A -> B interpolation."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
from collections.abc import Iterator

import numpy as np

from .. import distributed
from ..devices import resolve_device
from ..directions import DIRECTIONS, NORMALIZATIONS
from ..errors import SharpscopeError
from ..files import atomic_write, exclusive_lock, remove_stale_temporaries
from ..grid import DISTRIBUTE
from ..landscape import interpolation_for_checkpoints, landscape_for_checkpoint
from ..settings import (
    DEFAULT_POINTS,
    INTERPOLATION_POINTS,
    MAX_DRAW,
    InterpolationSettings,
    LandscapeSettings,
)
from ..surface import PartialMismatch, Surface, save_partial, summarize_draws
from .common import (
    add_checkpoint_arguments,
    add_device_argument,
    add_evaluation_arguments,
    add_overwrite_argument,
    check_output_path,
    loading_from_args,
    seed_type,
)


# One add_argument per option, in the order --help lists them: long, but a list to read
# down, not logic (splitting it would scatter the options of one command).
def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "landscape",
        help="loss surfaces along directions, or the interpolation between two checkpoints",
        description="With one checkpoint: L(w + a d1) (--dim 1) or L(w + a d1 + b d2) "
        "(--dim 2) along filter-normalized Gaussian directions (Li et al. 2018) or the "
        "other --directions. With two: L((1 - t) w_A + t w_B) (Goodfellow et al. 2015). "
        "Saves an .npz (coordinates, loss, accuracy, settings as JSON, seed) for "
        "`sharpscope plot`. An interrupted run keeps its finished points in "
        "OUT.partial.npz; --resume continues from there.",
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
        metavar="N",
        help=f"points per axis, or NX NY for a non-square 2-D grid (default: {DEFAULT_POINTS} "
        f"as Li et al. 2018; interpolation: {INTERPOLATION_POINTS} as their code's example)",
    )
    p.add_argument(
        "--range",
        nargs="+",
        metavar="LOW HIGH",
        help="coordinate range of every axis, or 'auto' to widen it until the edge loss is "
        "10x the centre's (default: -1 1; auto for hessian and pca; interpolation: -0.5 1.5)",
    )
    p.add_argument(
        "--directions",
        choices=DIRECTIONS,
        default="filter",
        help="filter (default), layer or none: normalization of Gaussian directions; "
        "hessian: top eigenvectors; pca: principal components of a training trajectory",
    )
    p.add_argument(
        "--trajectory",
        metavar="RUN_DIR",
        help="pca: the run folder whose trajectory/ holds checkpoints saved by "
        "`sharpscope train --save-every N` (default: the checkpoint's folder)",
    )
    p.add_argument(
        "--seed", type=seed_type, default=0, help="seed of the directions and examples (default: 0)"
    )
    p.add_argument(
        "--orthogonalize",
        action="store_true",
        help="--dim 2: make d2 orthogonal to d1 (after normalization)",
    )
    p.add_argument(
        "--include-1d",
        action="store_true",
        help="perturb biases and normalization parameters too (default: zero there)",
    )
    p.add_argument(
        "--bn-recalibrate",
        action="store_true",
        help="recompute BatchNorm statistics on training data at every point "
        "(torch.optim.swa_utils.update_bn; slower); default: eval mode",
    )
    p.add_argument(
        "--include-buffers",
        action="store_true",
        help="interpolation: interpolate BatchNorm statistics too (default: A's)",
    )
    p.add_argument(
        "--save-directions", action="store_true", help="store the vectors d1, d2 in the .npz"
    )
    p.add_argument(
        "--draws",
        type=int,
        default=1,
        metavar="N",
        help="random directions: the same landscape along N direction draws (draw k: "
        "Gaussian draws 2k and 2k+1 of --seed), OUT for draw 0 (the picture) and "
        "OUT-stem.drawK.npz for the others; prints the mean and maximum loss rise as mean "
        "± standard error over the draws (default: 1)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from OUT.partial.npz",
    )
    p.add_argument(
        "--distribute",
        choices=DISTRIBUTE,
        default="points",
        help="under torchrun: deal the grid points out to the processes, each evaluating "
        "on all the examples (default), or shard the examples and evaluate every point "
        "on every process (for evaluation sets too large for one device)",
    )
    p.add_argument("--label", help="legend label (default: the optimizer, from the checkpoint)")
    add_checkpoint_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_overwrite_argument(p, "the .npz")
    add_evaluation_arguments(p)
    add_device_argument(p)
    p.set_defaults(func=run)


def draw_paths(out: str, draws: int) -> list[str]:
    """Where each direction draw's surface goes: ``out`` for draw 0, then
    ``x.draw1.npz``, ``x.draw2.npz``, ... beside it."""
    stem = os.path.splitext(out)[0]
    return [out] + [f"{stem}.draw{k}.npz" for k in range(1, draws)]


def partial_path(out: str) -> str:
    """Where an unfinished run keeps its points: ``x.npz`` -> ``x.partial.npz``."""
    return os.path.splitext(out)[0] + ".partial.npz"


def _range(values: list[str]) -> tuple[float, float] | str:
    """--range's words: LOW HIGH, or auto (checked further by the settings)."""
    if values == ["auto"]:
        return "auto"
    if len(values) != 2:
        raise SharpscopeError(f"--range takes LOW HIGH or auto, got {' '.join(values)}")
    try:
        return float(values[0]), float(values[1])
    except ValueError:
        raise SharpscopeError(f"--range: not numbers: {' '.join(values)}") from None


def _settings(args: argparse.Namespace) -> LandscapeSettings | InterpolationSettings:
    """Every usage error, before any checkpoint is read; the settings the options give."""
    # --resume: a finished file is checked against this run and kept (see _reuse).
    overwrite = args.overwrite or args.resume
    check_output_path(args.out, overwrite=overwrite, inputs=args.checkpoints)
    if not args.out.endswith(".npz"):
        raise SharpscopeError(f"--out must end in .npz, got {args.out}")
    if not 1 <= args.draws <= MAX_DRAW:
        raise SharpscopeError(f"--draws must be in 1..{MAX_DRAW}, got {args.draws}")
    for out in draw_paths(args.out, args.draws):
        check_output_path(out, overwrite=overwrite, inputs=args.checkpoints)
        # The partial file is an output too: never one of the inputs.
        check_output_path(partial_path(out), inputs=args.checkpoints)
    if len(args.checkpoints) > 2:
        raise SharpscopeError("give one checkpoint (surfaces) or two (interpolation)")
    for path in args.checkpoints:
        if not os.path.isfile(path):
            raise SharpscopeError(f"{path}: no such file")
    points = args.points or []
    options = {
        "split": args.split,
        "samples": args.samples,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "bn_recalibrate": args.bn_recalibrate,
        "distribute": args.distribute,
        "label": args.label,
    }
    if args.range is not None:
        options["range"] = _range(args.range)
    if len(args.checkpoints) == 1:
        if args.include_buffers:
            raise SharpscopeError("--include-buffers applies to an interpolation (two checkpoints)")
        if points:
            options["points"] = points[0] if len(points) == 1 else tuple(points)
        if args.draws > 1 and args.directions not in NORMALIZATIONS:
            raise SharpscopeError("--draws applies to random directions (filter, layer, none)")
        return LandscapeSettings(
            **options,
            dim=args.dim,
            directions=args.directions,
            orthogonalize=args.orthogonalize,
            include_1d=args.include_1d,
            trajectory=args.trajectory,
            save_directions=args.save_directions,
        )
    wrong = [
        flag
        for flag, given in (
            ("--dim 2", args.dim != 1),
            ("--directions", args.directions != "filter"),
            ("--trajectory", args.trajectory is not None),
            ("--orthogonalize", args.orthogonalize),
            ("--include-1d", args.include_1d),
            ("--save-directions", args.save_directions),
            ("--draws", args.draws != 1),
            ("two --points", len(points) == 2),
            ("--range auto", args.range == ["auto"]),
        )
        if given
    ]
    if wrong:
        raise SharpscopeError(
            f"{', '.join(wrong)}: not for an interpolation between two checkpoints"
        )
    if points:
        options["points"] = points[0]
    options["include_buffers"] = args.include_buffers
    return InterpolationSettings(**options)


def _check_partial(out: str, resume: bool) -> None:
    """Under the lock: an unfinished run's file is continued only with --resume."""
    partial = partial_path(out)
    if os.path.exists(partial) and not resume:
        raise SharpscopeError(
            f"{partial} holds an unfinished run: add --resume to continue it, "
            "or delete it to start over"
        )


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM (``kill``) into KeyboardInterrupt meanwhile, so that an interrupted
    grid saves its finished points like Ctrl-C does."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)  # every rank: reads only, before the process group exists
    device = distributed.init_from_environment(resolve_device(args.device))
    surfaces = []
    try:
        for draw, out in enumerate(draw_paths(args.out, args.draws)):
            if draw:
                settings = dataclasses.replace(settings, draw=draw)
            with contextlib.ExitStack() as held:
                if distributed.is_main_process():
                    # One process computes a surface at a time: the partial file is its own.
                    held.enter_context(exclusive_lock(out + ".lock", f"landscape {out}"))
                    remove_stale_temporaries(out)
                    remove_stale_temporaries(partial_path(out))
                distributed.on_main(lambda out=out: _check_partial(out, args.resume))
                with _reuse(out, args.resume and not args.overwrite):
                    surfaces.append(_run(args, out, settings, device))
    finally:
        if distributed.launched_by_torchrun():
            # Leave the process group before exit: a gloo group torn down by the
            # interpreter's exit can abort the process ("terminate called ...").
            distributed.shutdown()
    if args.draws > 1 and distributed.is_main_process():
        print(_draws_summary(summarize_draws(surfaces)))
    return 0


def _run(args: argparse.Namespace, out: str, settings, device) -> Surface:
    progress = not args.quiet and sys.stderr.isatty() and distributed.is_main_process()
    partial = partial_path(out)
    try:
        with _sigterm_interrupts():
            surface = _compute(args, settings, device, progress, partial)
            if distributed.is_main_process():
                try:
                    surface.save(out)
                except BaseException:  # full disk, SIGTERM: the points are not lost
                    save_partial(surface, np.ones(surface.loss.shape, dtype=bool), partial)
                    raise
        if distributed.is_main_process():
            print(_summary(out, surface))
    except KeyboardInterrupt:
        if distributed.is_main_process() and os.path.exists(partial):
            print(
                f"sharpscope landscape: finished points kept in {partial}; "
                "run the same command with --resume to continue",
                file=sys.stderr,
            )
        raise
    return surface


@contextlib.contextmanager
def _reuse(out: str, resume: bool) -> Iterator[None]:
    """With --resume, a finished ``out`` (a draw done before an interruption, or a rerun
    of a finished command) is continued like a partial file: a copy of it is the partial
    file, so the same check of settings, weights and directions applies and no point is
    recomputed; a file made by another landscape is refused and left alone."""
    partial = partial_path(out)
    copied = resume and distributed.is_main_process() and os.path.isfile(out)
    if copied and not os.path.exists(partial):
        atomic_write(partial, lambda tmp: shutil.copyfile(out, tmp))
    else:
        copied = False
    try:
        yield
    except PartialMismatch:
        if copied and os.path.exists(partial):
            os.remove(partial)
            raise SharpscopeError(
                f"{out} exists and holds another landscape: pass --overwrite to replace it, "
                "or another --out"
            ) from None
        raise


def _draws_summary(result: dict) -> str:
    """One line: the mean and maximum rise over the draws, mean ± standard error."""
    parts = [
        f"{label} {result[name]['mean']:.4g} ± {result[name]['stderr']:.2g}"
        for name, label in (("mean_rise", "mean loss rise"), ("max_rise", "max loss rise"))
    ]
    return f"over {result['draws']} direction draws (mean ± s.e.): " + ", ".join(parts)


def _compute(args: argparse.Namespace, settings, device, progress: bool, partial: str) -> Surface:
    common = {"device": device, "resume_path": partial, "progress": progress}
    common.update(loading_from_args(args))
    if isinstance(settings, InterpolationSettings):
        return interpolation_for_checkpoints(*args.checkpoints, settings, **common)
    return landscape_for_checkpoint(args.checkpoints[0], settings, **common)


def _summary(out: str, surface: Surface) -> str:
    finite = surface.loss[np.isfinite(surface.loss)]
    shape = "x".join(str(n) for n in surface.loss.shape[::-1])
    line = f"wrote {out}: {surface.kind} landscape, {shape} points"
    if finite.size:
        line += f", loss {finite.min():.4g} to {finite.max():.4g}"
    bad = int(surface.loss.size - np.isfinite(surface.loss).sum())
    if bad:  # overflow far from the minimum: a finding, kept as NaN/inf in the file
        line += f"; {bad} point(s) with a non-finite loss"
    cos = surface.settings.get("cos_d1_d2")
    if cos is not None:
        line += f", cos(d1, d2) = {cos:.2g}"
    return line
