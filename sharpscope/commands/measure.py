"""``sharpscope measure CHECKPOINT [CHECKPOINT ...]``: one table, a column per checkpoint."""

from __future__ import annotations

import argparse
import os
import sys

from .. import distributed
from ..measure import DEFAULT_RHOS, format_table, measure_checkpoint
from .common import (
    add_device_argument,
    add_evaluation_arguments,
    add_model_arguments,
    check_output_path,
    model_options_from_args,
    resolve_device,
    write_json,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "measure",
        help="loss, accuracy, sharpness and Hessian spectrum of checkpoints",
        description="Measure each checkpoint: train/test loss and accuracy, worst-case "
        "sharpness max_{||eps||<=rho} L(w+eps) - L(w) by APGD (Andriushchenko et al. 2023), "
        "the top Hessian eigenvalues (Lanczos) and the Hessian trace (Hutchinson). "
        "Prints one table, a column per checkpoint; --json writes every number with its "
        "settings. Under torchrun, examples are sharded over the processes.",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    add_evaluation_arguments(p)
    s = p.add_argument_group("sharpness")
    s.add_argument(
        "--rho",
        type=float,
        nargs="+",
        default=list(DEFAULT_RHOS),
        help="radius, one or several (default: 0.05, SAM's)",
    )
    s.add_argument("--norm", choices=("l2", "linf"), default="l2", help="(default: l2)")
    s.add_argument(
        "--adaptive", action="store_true", help="adaptive sharpness: eps relative to |w| + eta"
    )
    s.add_argument("--eta", type=float, default=0.0, help="adaptive offset (default: 0)")
    s.add_argument("--m", type=int, help="m-sharpness: mean over batches of M examples")
    s.add_argument(
        "--steps", type=int, default=20, help="APGD steps (default: 20, Andriushchenko et al. 2023)"
    )
    s.add_argument("--restarts", type=int, default=1, help="APGD restarts (default: 1)")
    s.add_argument(
        "--average",
        action="store_true",
        help="also average-case sharpness (Monte Carlo, with standard error)",
    )
    h = p.add_argument_group("Hessian")
    h.add_argument(
        "--eigs",
        type=int,
        default=1,
        metavar="K",
        help="number of top eigenvalues (default: 1; 0 for none)",
    )
    h.add_argument("--smallest", action="store_true", help="also the K smallest eigenvalues")
    h.add_argument(
        "--eig-method",
        choices=("lanczos", "power", "pyhessian"),
        default="lanczos",
        help="(default: lanczos)",
    )
    h.add_argument(
        "--trace",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Hutchinson trace (default: on)",
    )
    h.add_argument("--trace-samples", type=int, default=100, help="probes (default: 100)")
    h.add_argument(
        "--density",
        action="store_true",
        help="eigenvalue density by stochastic Lanczos quadrature (JSON only)",
    )
    p.add_argument(
        "--param-filter",
        choices=("all", "weights"),
        default="all",
        help="parameters that count: all, or weights without biases and "
        "normalization layers (default: all)",
    )
    p.add_argument("--seed", type=int, default=0, help="examples, restarts and probes (default: 0)")
    p.add_argument("--json", metavar="FILE", help="write every number with its settings")
    p.add_argument("--labels", nargs="+", help="column labels (default: file names)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_argument(p)
    g = p.add_argument_group("plain state_dict checkpoints")
    g.add_argument("--data", help="data set the model was trained on")
    add_model_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import SharpscopeError

    if args.json:
        check_output_path(args.json)
    if args.labels and len(args.labels) != len(args.checkpoints):
        raise SharpscopeError("--labels needs one label per checkpoint")
    for path in args.checkpoints:
        if not os.path.isfile(path):
            raise SharpscopeError(f"{path}: no such file")
    if args.samples is not None and args.samples <= 0:
        raise SharpscopeError(f"--samples must be positive, got {args.samples}")
    if args.steps < 1 or args.restarts < 1:
        raise SharpscopeError("--steps and --restarts must be at least 1")
    device = distributed.init_from_environment(resolve_device(args.device))
    main = distributed.is_main_process()
    options = {k: v for k, v in model_options_from_args(args).items() if v is not None}
    documents = []
    for path in args.checkpoints:
        documents.append(
            measure_checkpoint(
                path,
                model=args.model,
                data=args.data,
                model_options=options,
                device=device,
                split=args.split,
                samples=args.samples,
                batch_size=args.batch_size,
                rhos=args.rho,
                norm=args.norm,
                adaptive=args.adaptive,
                eta=args.eta,
                m=args.m,
                steps=args.steps,
                restarts=args.restarts,
                average=args.average,
                eigs=args.eigs,
                smallest=args.smallest,
                eig_method=args.eig_method,
                trace=args.trace,
                trace_samples=args.trace_samples,
                density=args.density,
                param_filter=args.param_filter,
                seed=args.seed,
                progress=main and not args.quiet and sys.stderr.isatty(),
            )
        )
    if main:
        labels = args.labels or [
            os.path.basename(os.path.dirname(os.path.abspath(p))) + "/" + os.path.basename(p)
            for p in args.checkpoints
        ]
        print(format_table(documents, labels))
        if args.json:
            write_json(args.json, {"command": "measure", "labels": labels, "results": documents})
    return 0
