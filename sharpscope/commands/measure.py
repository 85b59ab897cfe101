"""``sharpscope measure CHECKPOINT [CHECKPOINT ...]``: one table, a column per checkpoint."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .. import distributed
from ..data import Dataset
from ..devices import resolve_device
from ..errors import SharpscopeError
from ..files import remove_stale_temporaries, write_json
from ..hessian import METHODS
from ..measure import (
    DEFAULT_AVERAGE_SAMPLES,
    DEFAULT_EIG_TOL,
    DEFAULT_RHOS,
    DEFAULT_STEPS,
    DEFAULT_TRACE_SAMPLES,
    check_measure_settings,
    check_model,
    checkpoint_document,
    checkpoint_loss,
    format_table,
    load_model_and_data,
    measure,
)
from ..objective import PARAM_FILTERS
from ..sharpness import NORMS
from .common import (
    add_checkpoint_arguments,
    add_device_argument,
    add_evaluation_arguments,
    add_overwrite_argument,
    check_output_path,
    loading_from_args,
    seed_type,
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
    s.add_argument("--norm", choices=NORMS, default="l2", help="(default: l2)")
    s.add_argument(
        "--adaptive", action="store_true", help="adaptive sharpness: eps relative to |w| + eta"
    )
    s.add_argument("--eta", type=float, default=0.0, help="adaptive offset (default: 0)")
    s.add_argument(
        "--m",
        "--m-sharpness",
        type=int,
        metavar="M",
        help="m-sharpness: the mean over batches of M examples of each batch's own maximum "
        "(default: the whole set as one batch). Under torchrun write --m-sharpness.",
    )
    s.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"APGD steps (default: {DEFAULT_STEPS}, Andriushchenko et al. 2023)",
    )
    s.add_argument("--restarts", type=int, default=1, help="APGD restarts (default: 1)")
    s.add_argument(
        "--average",
        action="store_true",
        help="also average-case sharpness E[L(w + eps)] - L(w), eps_i ~ N(0, (rho c_i)^2) "
        "(l2) or U[-rho c_i, rho c_i] (linf); Monte Carlo with standard error",
    )
    s.add_argument(
        "--average-samples",
        type=int,
        default=DEFAULT_AVERAGE_SAMPLES,
        metavar="N",
        help=f"Monte Carlo draws for --average (default: {DEFAULT_AVERAGE_SAMPLES})",
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
        choices=METHODS,
        default="lanczos",
        help="(default: lanczos; pyhessian needs the pyhessian extra)",
    )
    h.add_argument(
        "--eig-tol",
        type=float,
        default=DEFAULT_EIG_TOL,
        help=f"relative residual for eigenvalues (default: {DEFAULT_EIG_TOL:g})",
    )
    h.add_argument(
        "--trace",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Hutchinson trace (default: on)",
    )
    h.add_argument(
        "--trace-samples",
        type=int,
        default=DEFAULT_TRACE_SAMPLES,
        help=f"Rademacher probes (default: {DEFAULT_TRACE_SAMPLES}, PyHessian's)",
    )
    h.add_argument(
        "--density",
        action="store_true",
        help="eigenvalue density by stochastic Lanczos quadrature (JSON only)",
    )
    p.add_argument(
        "--param-filter",
        choices=PARAM_FILTERS,
        default="all",
        help="parameters that count: all, or weights without biases and "
        "normalization layers (default: all)",
    )
    p.add_argument(
        "--seed", type=seed_type, default=0, help="examples, restarts and probes (default: 0)"
    )
    p.add_argument("--json", metavar="FILE", help="write every number with its settings")
    add_overwrite_argument(p, "the --json file")
    p.add_argument("--labels", nargs="+", help="column labels (default: file names)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_argument(p)
    add_checkpoint_arguments(p)
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace, progress: bool) -> dict[str, Any]:
    """The keywords of :func:`~sharpscope.measure.measure` the options give."""
    return {
        "split": args.split,
        "samples": args.samples,
        "batch_size": args.batch_size,
        "rhos": args.rho,
        "norm": args.norm,
        "adaptive": args.adaptive,
        "eta": args.eta,
        "m": args.m,
        "steps": args.steps,
        "restarts": args.restarts,
        "average": args.average,
        "average_samples": args.average_samples,
        "eigs": args.eigs,
        "smallest": args.smallest,
        "eig_method": args.eig_method,
        "eig_tol": args.eig_tol,
        "trace": args.trace,
        "trace_samples": args.trace_samples,
        "density": args.density,
        "param_filter": args.param_filter,
        "seed": args.seed,
        "progress": progress,
    }


def run(args: argparse.Namespace) -> int:
    # Everything that can be refused is refused before the first long computation:
    # settings, output folder and labels; then every checkpoint is loaded and checked
    # (rebuildable, parameter count, finite loss); only then is anything measured.
    settings = _settings(args, progress=not args.quiet and sys.stderr.isatty())
    check_measure_settings(**settings)
    if args.json is not None:
        check_output_path(args.json, overwrite=args.overwrite, inputs=args.checkpoints)
        if int(os.environ.get("RANK", "0")) == 0:
            remove_stale_temporaries(args.json)  # of a killed earlier write of it
    if args.density and not args.json:
        raise SharpscopeError("--density is a curve, not a table entry: give --json FILE for it")
    if args.labels and len(args.labels) != len(args.checkpoints):
        raise SharpscopeError("--labels needs one label per checkpoint")
    device = distributed.init_from_environment(resolve_device(args.device))
    try:
        _measure_all(args, settings, device)
    finally:
        if distributed.launched_by_torchrun():
            # Leave the process group before exit: a gloo group torn down by the
            # interpreter's exit can abort the process ("terminate called ...").
            distributed.shutdown()
    return 0


def _measure_all(args: argparse.Namespace, settings: dict, device) -> None:
    settings["progress"] = settings["progress"] and distributed.is_main_process()
    datasets: dict[str, Dataset] = {}  # checkpoints of one data set share it
    loaded = []
    for path in args.checkpoints:
        net, dataset, meta = load_model_and_data(
            path, device=device, datasets=datasets, **loading_from_args(args)
        )
        check_model(net, dataset, loss=checkpoint_loss(meta), device=device, **settings)
        loaded.append((path, net, dataset, meta))
    documents = [
        checkpoint_document(
            path, meta, measure(net, dataset, loss=checkpoint_loss(meta), device=device, **settings)
        )
        for path, net, dataset, meta in loaded
    ]
    if distributed.is_main_process():
        labels = args.labels or [
            os.path.basename(os.path.dirname(os.path.abspath(p))) + "/" + os.path.basename(p)
            for p in args.checkpoints
        ]
        print(format_table(documents, labels))
        if args.json:
            write_json(args.json, {"command": "measure", "labels": labels, "results": documents})
