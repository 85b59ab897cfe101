"""``sharpscope plot FILE.npz [FILE.npz ...] --out FIG``: figures from saved surfaces."""

from __future__ import annotations

import argparse
import math
import os

from ..errors import SharpscopeError
from ..files import remove_stale_temporaries
from ..plots import N_LEVELS, STYLES, figure_format, plot_1d, plot_2d
from .common import add_overwrite_argument, check_output_path

# More contour intervals than this are no longer readable (and matplotlib warns).
MAX_LEVELS = 50


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plot",
        help="paper-quality figures from saved landscapes (.npz)",
        description="Draw landscapes saved by `sharpscope landscape`: 1-D and interpolation "
        "curves overlaid and labeled, or 2-D surfaces side by side with one shared color "
        "scale, one set of contour levels and one colorbar. The format follows the "
        "extension of --out: vector .pdf / .svg, or .png at 300 dpi.",
    )
    p.add_argument("files", nargs="+", metavar="FILE.npz", help="surfaces, all 1-D or all 2-D")
    p.add_argument("--out", required=True, metavar="FIG", help="figure file: .pdf, .png or .svg")
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
        "when the values span two decades)",
    )
    scale.add_argument("--linear", action="store_true", help="2-D: force linear levels")
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
