"""``sharpscope demo --out DIR``: train SGD and SAM alike, then compare the two minima."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from ..demo import DEMO_EPOCHS, DEMO_LABEL_NOISE, DEMO_SEEDS, demo
from .compare import add_compare_arguments, compare_settings, run_options

# The demo's evaluation set: 512 examples keep Li et al.'s 51 x 51 grid of each pictured
# minimum near 20 s on 2 CPU cores; at 1024 examples one grid alone took over 2 minutes.
DEMO_SAMPLES = 512


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train SGD and SAM with the same seed and budget, then compare them",
        description="Train a small CNN on scikit-learn's digits with 20% of its training "
        "labels replaced by other classes (Foret et al. 2021, Table 4), with SGD and with "
        "SAM over --seeds seeds (same epochs and settings), into DIR/sgd-S and "
        "DIR/sam-S, then run `sharpscope compare` on the two groups into DIR/compare: "
        "every number as mean ± standard error over the seeds with Welch's test of the "
        "difference, the interpolation, and 1-D and 2-D landscapes side by side with one "
        "color scale. About 7 minutes on 2 CPU cores (3 of them training); --quick for "
        "coarse grids.",
    )
    add_compare_arguments(p, out_default=os.path.join("runs", "demo"), samples=DEMO_SAMPLES)
    p.add_argument(
        "--seeds",
        type=int,
        default=DEMO_SEEDS,
        help=f"training seeds per optimizer, from --seed (default: {DEMO_SEEDS})",
    )
    p.add_argument(
        "--label-noise",
        type=float,
        default=DEMO_LABEL_NOISE,
        metavar="FRACTION",
        help=f"training labels replaced by other classes (default: {DEMO_LABEL_NOISE:g}, the "
        "mildest noise of Foret et al. 2021, Table 4; 0 for clean labels)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=DEMO_EPOCHS,
        help=f"training epochs for both (default: {DEMO_EPOCHS}, long enough for SGD to fit "
        "the noisy labels)",
    )
    p.add_argument("--rho", type=float, help="SAM radius (default: the trainer's, 0.05)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace earlier runs in DIR/sgd, DIR/sam and DIR/compare",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    demo(
        args.out,
        seeds=args.seeds,
        label_noise=args.label_noise,
        epochs=args.epochs,
        rho=args.rho,
        overwrite=args.overwrite,
        **run_options(args),
        **{k: v for k, v in dataclasses.asdict(compare_settings(args)).items() if k != "draws"},
    )
    report = os.path.join(args.out, "compare", "report.md")
    print(f"wrote {report} ({time.perf_counter() - start:.0f} s)")
    return 0
