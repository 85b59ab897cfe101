"""``sharpscope plot``: figures from saved files.

``sharpscope plot FILE.npz [FILE.npz ...] --out FIG`` draws saved surfaces (the default
``--kind surface``); ``--kind training | density | rho | eigenvalues`` with repeated
``--group LABEL PATH [PATH ...]`` draws the figures of :mod:`sharpscope.figures` from run
folders (training) or ``sharpscope measure --json`` files (the others), mean ± standard
error over each group.
"""

from __future__ import annotations

import argparse
import math
import os

from ..errors import SharpscopeError
from ..files import remove_stale_temporaries
from ..plots import N_LEVELS, STYLES, figure_format, plot_1d, plot_2d
from .common import add_overwrite_argument, check_output_path, given_options

# More contour intervals than this are no longer readable (and matplotlib warns).
MAX_LEVELS = 50
KINDS = ("surface", "training", "density", "rho", "eigenvalues")
# Options that only surfaces take, and those only --kind training takes.
SURFACE_ONLY = ("style", "quantity", "no_accuracy", "labels", "levels", "vmax")
TRAINING_ONLY = ("x_axis", "no_sharpness")


# One add_argument per option, in the order --help lists them: long, but a list to read
# down, not logic.
def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plot",
        help="paper-quality figures from saved landscapes (.npz)",
        description="Draw landscapes saved by `sharpscope landscape`: 1-D and interpolation "
        "curves overlaid and labeled, or 2-D surfaces side by side with one shared color "
        "scale, one set of contour levels and one colorbar. With --kind and --group, draw "
        "groups of seeds (mean ± standard error) from run folders or measure JSON files: "
        "the top Hessian eigenvalue over training with 2/η (training), the SLQ eigenvalue "
        "density (density), worst-case sharpness against rho (rho), the top-k eigenvalues "
        "(eigenvalues). The format follows the extension of --out: vector .pdf / .svg, or "
        ".png at 300 dpi.",
    )
    p.add_argument(
        "files", nargs="*", metavar="FILE.npz", help="surfaces, all 1-D or all 2-D (--kind surface)"
    )
    p.add_argument("--out", required=True, metavar="FIG", help="figure file: .pdf, .png or .svg")
    p.add_argument(
        "--kind",
        choices=KINDS,
        default="surface",
        help="surface: saved landscapes (FILE.npz...); training: top eigenvalue (and "
        "sharpness) over training from run folders trained with --track-every; density, "
        "rho, eigenvalues: from `sharpscope measure --json` files (default: surface)",
    )
    p.add_argument(
        "--group",
        nargs="+",
        action="append",
        metavar=("LABEL", "PATH"),
        help="with --kind other than surface, repeated: a label and its inputs, one per "
        "seed (run folders for training; measure JSON files, every result in a file "
        "counting as one seed, for the others), e.g. --group SGD a.json b.json",
    )
    p.add_argument(
        "--x-axis",
        choices=("step", "epoch"),
        default="step",
        help="--kind training: steps or epochs on the x axis (default: step)",
    )
    p.add_argument(
        "--no-sharpness",
        action="store_true",
        help="--kind training: no sharpness panel (default: one when every run tracked it)",
    )
    p.add_argument(
        "--style",
        choices=STYLES,
        default="contour",
        help="2-D style: filled contours with contour lines, 3-D surface, or heatmap "
        "(default: contour)",
    )
    scale = p.add_mutually_exclusive_group()
    scale.add_argument(
        "--log",
        action="store_true",
        help="log scale: the loss axis (1-D), log-spaced levels (2-D; the default there "
        "when the values span two decades), the y axis (training, rho, eigenvalues)",
    )
    scale.add_argument(
        "--linear",
        action="store_true",
        help="2-D: force linear levels; density, eigenvalues: a linear y axis (the default "
        "there is log: always for density, when every eigenvalue is positive for eigenvalues)",
    )
    p.add_argument(
        "--quantity",
        choices=("loss", "accuracy"),
        default="loss",
        help="2-D: what to color (default: loss)",
    )
    p.add_argument(
        "--no-accuracy", action="store_true", help="1-D: the loss panel only, no accuracy panel"
    )
    p.add_argument("--labels", nargs="+", help="one label per file (default: the files' own)")
    p.add_argument(
        "--columns",
        type=int,
        choices=(1, 2),
        help="figure width: 1 column (3.3 in) or 2 (6.9 in) (default: 1 for curves and a "
        "single surface, 2 for surfaces side by side)",
    )
    p.add_argument("--title", help="figure title (default: none; papers caption instead)")
    p.add_argument(
        "--levels",
        type=int,
        default=N_LEVELS,
        help=f"2-D: number of contour intervals (default: {N_LEVELS})",
    )
    p.add_argument("--vmax", type=float, help="2-D: cap the color scale at this value")
    add_overwrite_argument(p, "the figure")
    p.set_defaults(func=run, _parser=p)


def run(args: argparse.Namespace) -> int:
    if args.kind != "surface":
        return _run_groups(args)
    if args.group:
        raise SharpscopeError(
            "--group takes the inputs of --kind training, density, rho or eigenvalues; "
            "surfaces are FILE.npz... with --labels"
        )
    _refuse_options(args, TRAINING_ONLY, "--kind training")
    if not args.files:
        raise SharpscopeError(
            "no surfaces: sharpscope plot FILE.npz... --out FIG (or --kind KIND --group "
            "LABEL PATH...)"
        )
    return _run_surfaces(args)


def _given(args: argparse.Namespace) -> dict:
    """The options the command line wrote out (all non-default ones without it)."""
    parser, argv = getattr(args, "_parser", None), getattr(args, "_argv", None)
    if parser is not None and argv is not None:
        return given_options(parser, argv)
    defaults = {"style": "contour", "quantity": "loss", "levels": N_LEVELS, "x_axis": "step"}
    return {k: v for k, v in vars(args).items() if v not in (None, False, defaults.get(k))}


def _refuse_options(args: argparse.Namespace, names: tuple[str, ...], where: str) -> None:
    given = _given(args)
    for name in names:
        if name in given:
            option = "--" + name.replace("_", "-")
            raise SharpscopeError(f"{option} applies to {where} only, not --kind {args.kind}")


def _run_groups(args: argparse.Namespace) -> int:
    from .. import figures

    kind = args.kind
    if args.files:
        raise SharpscopeError(
            f"--kind {kind} takes its inputs as --group LABEL PATH..., not positional files"
        )
    if not args.group:
        raise SharpscopeError(f"--kind {kind} needs --group LABEL PATH... (once per group)")
    _refuse_options(args, SURFACE_ONLY, "--kind surface")
    if kind != "training":
        _refuse_options(args, TRAINING_ONLY, "--kind training")
    if args.linear and kind in ("training", "rho"):
        raise SharpscopeError(f"--linear: the y axis of --kind {kind} is linear already")
    if args.log and kind == "density":
        raise SharpscopeError("--log: the density axis is log already")
    groups: dict[str, list[str]] = {}
    for label, *paths in args.group:
        if not label.strip():
            raise SharpscopeError("--group needs a label first, e.g. --group SGD a.json")
        if not paths:
            raise SharpscopeError(f"--group {label} names no input: --group {label} PATH...")
        if label in groups:
            raise SharpscopeError(f"--group {label} is given twice: one --group per label")
        groups[label] = paths
    inputs = [p for paths in groups.values() for p in paths]
    seen: dict[str, str] = {}
    for label, paths in groups.items():  # one seed counted twice would shrink the bars
        for path in paths:
            real = os.path.realpath(path)
            if real in seen:
                raise SharpscopeError(
                    f"--group {seen[real]}{'' if seen[real] == label else ' and ' + label} "
                    f"names one file twice ({path}): give each seed once"
                )
            seen[real] = label
    if kind == "training":  # the files read in each run folder
        inputs = [
            os.path.join(p, name) for p in inputs for name in ("metrics.jsonl", "config.json")
        ] + inputs
    check_output_path(args.out, overwrite=args.overwrite, inputs=inputs)
    remove_stale_temporaries(args.out)  # of a killed earlier write of it
    figure_format(args.out)
    common = {"columns": args.columns or 1, "title": args.title}
    if kind == "training":
        runs = {label: [figures.read_run(p) for p in paths] for label, paths in groups.items()}
        figures.plot_training(
            runs,
            args.out,
            x=args.x_axis,
            sharpness=False if args.no_sharpness else None,
            log=args.log,
            **common,
        )
    else:
        documents = {
            label: [doc for p in paths for doc in figures.read_measure_file(p)]
            for label, paths in groups.items()
        }
        if kind == "density":
            figures.plot_density(documents, args.out, log=not args.linear, **common)
        elif kind == "rho":
            figures.plot_sharpness_rho(documents, args.out, log=args.log, **common)
        else:
            log = True if args.log else (False if args.linear else None)
            figures.plot_eigenvalues(documents, args.out, log=log, **common)
    print(f"wrote {args.out}")
    return 0


def _run_surfaces(args: argparse.Namespace) -> int:
    from ..surface import load_surface

    check_output_path(args.out, overwrite=args.overwrite, inputs=args.files)
    remove_stale_temporaries(args.out)  # of a killed earlier write of it
    figure_format(args.out)  # a bad output path fails before any file is read
    if not 1 <= args.levels <= MAX_LEVELS:
        raise SharpscopeError(f"--levels must be between 1 and {MAX_LEVELS}, got {args.levels}")
    if args.vmax is not None and not math.isfinite(args.vmax):
        raise SharpscopeError(f"--vmax must be a finite number, got {args.vmax}")
    if args.labels is not None and len(args.labels) != len(args.files):
        raise SharpscopeError(f"--labels got {len(args.labels)} labels for {len(args.files)} files")
    surfaces = [load_surface(path) for path in args.files]
    labels = args.labels
    if labels is None:  # the files' own labels, else their names
        labels = [
            str(s.settings.get("label") or os.path.splitext(os.path.basename(path))[0])
            for s, path in zip(surfaces, args.files, strict=True)
        ]
    kinds = {s.kind for s in surfaces}
    if kinds == {"2d"}:
        plot_2d(
            surfaces,
            args.out,
            style=args.style,
            quantity=args.quantity,
            labels=labels,
            log=True if args.log else (False if args.linear else None),
            n_levels=args.levels,
            vmax=args.vmax,
            columns=args.columns,
            title=args.title,
        )
    elif "2d" in kinds:
        raise SharpscopeError(
            "cannot mix 2-D surfaces with 1-D curves in one figure; plot them separately"
        )
    else:
        endpoints = ("A", "B")
        if kinds == {"interpolation"} and len(surfaces) == 1:
            endpoints = tuple(surfaces[0].settings.get("labels") or endpoints)
        plot_1d(
            surfaces,
            args.out,
            labels=labels,
            accuracy=not args.no_accuracy,
            log=args.log,
            columns=args.columns or 1,
            title=args.title,
            endpoints=endpoints,
        )
    print(f"wrote {args.out}")
    return 0
