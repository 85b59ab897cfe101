"""``sharpscope demo --out DIR``: train SGD and SAM alike, then compare the two minima."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from ..demo import DEMO_SEEDS, demo
from .compare import add_compare_arguments, compare_settings, run_options

# The demo's evaluation set: 512 examples keep Li et al.'s 51 x 51 grid and the whole run
# (two trainings, two measurements, five landscapes) near 70 s on 2 CPU cores (108 s with
# other jobs running); at 1024 examples one 51 x 51 grid alone took over 2 minutes.
DEMO_SAMPLES = 512


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train SGD and SAM with the same seed and budget, then compare them",
        description="Train a small CNN on scikit-learn's digits twice, with SGD and with "
        "SAM (same seed, same epochs, the trainer's defaults), into DIR/sgd and DIR/sam, "
        "then run `sharpscope compare` on the two into DIR/compare: the measure table, "
        "the interpolation, and 1-D and 2-D landscapes side by side with one color scale. "
        "About 70 s on 2 CPU cores at the defaults; --quick for a look in seconds.",
    )
    add_compare_arguments(p, out_default=os.path.join("runs", "demo"), samples=DEMO_SAMPLES)
    p.add_argument(
        "--seeds",
        type=int,
        default=DEMO_SEEDS,
        help=f"training seeds per optimizer, from --seed (default: {DEMO_SEEDS})",
    )
    p.add_argument("--epochs", type=int, help="training epochs for both (default: the trainer's)")
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
        epochs=args.epochs,
        rho=args.rho,
        overwrite=args.overwrite,
        **run_options(args),
        **{k: v for k, v in dataclasses.asdict(compare_settings(args)).items() if k != "draws"},
    )
    report = os.path.join(args.out, "compare", "report.md")
    print(f"wrote {report} ({time.perf_counter() - start:.0f} s)")
    return 0
