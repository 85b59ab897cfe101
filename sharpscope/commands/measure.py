"""``sharpscope measure CHECKPOINT [CHECKPOINT ...]``: one table, a column per checkpoint."""

from __future__ import annotations

import argparse
import os
import sys

from .. import distributed
from ..data import Dataset
from ..devices import resolve_device
from ..errors import SharpscopeError
from ..figures import plot_correlation
from ..files import remove_stale_temporaries, write_json
from ..groups import correlations, format_correlations
from ..hessian import METHODS
from ..measure import (
    check_model,
    checkpoint_document,
    checkpoint_loss,
    format_table,
    load_model_and_data,
    measure,
)
from ..objective import PARAM_FILTERS
from ..plots import figure_format
from ..settings import MeasureSettings
from ..sharpness import NORMS
from .common import (
    add_checkpoint_arguments,
    add_device_argument,
    add_evaluation_arguments,
    add_overwrite_argument,
    check_output_path,
    loading_from_args,
    seed_type,
    settings_from_args,
)


# One add_argument per option, in the order --help lists them: long, but a list to read
# down, not logic (splitting it would scatter the options of one command).
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
    d = MeasureSettings()
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    add_evaluation_arguments(p)
    p.add_argument(
        "--subsets",
        type=int,
        default=d.subsets,
        metavar="K",
        help="also measure the sharpness (first rho) and the top eigenvalue on K disjoint "
        "sets of --samples examples and report mean ± standard error: their sampling error "
        "(default: 1, off)",
    )
    s = p.add_argument_group("sharpness")
    s.add_argument(
        "--rho",
        type=float,
        nargs="+",
        default=list(d.rhos),
        help=f"radius, one or several (default: {' '.join(map(str, d.rhos))}, SAM's)",
    )
    s.add_argument("--norm", choices=NORMS, default=d.norm, help=f"(default: {d.norm})")
    s.add_argument(
        "--adaptive", action="store_true", help="adaptive sharpness: eps relative to |w| + eta"
    )
    s.add_argument("--eta", type=float, default=d.eta, help=f"adaptive offset (default: {d.eta})")
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
        default=d.steps,
        help=f"APGD steps (default: {d.steps}, Andriushchenko et al. 2023)",
    )
    s.add_argument(
        "--restarts", type=int, default=d.restarts, help=f"APGD restarts (default: {d.restarts})"
    )
    s.add_argument(
        "--average",
        action="store_true",
        help="also average-case sharpness E[L(w + eps)] - L(w), eps_i ~ N(0, (rho c_i)^2) "
        "(l2) or U[-rho c_i, rho c_i] (linf); Monte Carlo with standard error",
    )
    s.add_argument(
        "--average-samples",
        type=int,
        default=d.average_samples,
        metavar="N",
        help=f"Monte Carlo draws for --average (default: {d.average_samples})",
    )
    h = p.add_argument_group("Hessian")
    h.add_argument(
        "--eigs",
        type=int,
        default=d.eigs,
        metavar="K",
        help=f"number of top eigenvalues (default: {d.eigs}; 0 for none)",
    )
    h.add_argument("--smallest", action="store_true", help="also the K smallest eigenvalues")
    h.add_argument(
        "--eig-method",
        choices=METHODS,
        default=d.eig_method,
        help=f"(default: {d.eig_method}; pyhessian needs the pyhessian extra)",
    )
    h.add_argument(
        "--eig-tol",
        type=float,
        default=d.eig_tol,
        help=f"relative residual for eigenvalues (default: {d.eig_tol:g})",
    )
    h.add_argument(
        "--trace",
        action=argparse.BooleanOptionalAction,
        default=d.trace,
        help="Hutchinson trace (default: on)",
    )
    h.add_argument(
        "--trace-samples",
        type=int,
        default=d.trace_samples,
        help=f"Rademacher probes (default: {d.trace_samples}, PyHessian's)",
    )
    h.add_argument(
        "--density",
        action="store_true",
        help="eigenvalue density by stochastic Lanczos quadrature (JSON only)",
    )
    p.add_argument(
        "--param-filter",
        choices=PARAM_FILTERS,
        default=d.param_filter,
        help="parameters that count: all, or weights without biases and "
        "normalization layers (default: all)",
    )
    p.add_argument(
        "--seed", type=seed_type, default=d.seed, help="examples, restarts and probes (default: 0)"
    )
    p.add_argument(
        "--correlate",
        action="store_true",
        help="with 3 checkpoints or more (a sweep of seeds, learning rates, rho...): Kendall's "
        "tau between each sharpness number and the generalization gap, with a bootstrap "
        "95%% interval (Jiang et al. 2020)",
    )
    p.add_argument(
        "--scatter",
        metavar="FIG",
        help="with --correlate: a scatter figure of each measure against the generalization "
        "gap (.pdf, .png or .svg)",
    )
    p.add_argument("--json", metavar="FILE", help="write every number with its settings")
    add_overwrite_argument(p, "the --json file")
    p.add_argument("--labels", nargs="+", help="column labels (default: file names)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_argument(p)
    add_checkpoint_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Everything that can be refused is refused before the first long computation:
    # settings, output folder and labels; then every checkpoint is loaded and checked
    # (rebuildable, parameter count, finite loss); only then is anything measured.
    settings = settings_from_args(MeasureSettings, args, rhos="rho")
    if args.json is not None:
        check_output_path(args.json, overwrite=args.overwrite, inputs=args.checkpoints)
        if int(os.environ.get("RANK", "0")) == 0:
            remove_stale_temporaries(args.json)  # of a killed earlier write of it
    if args.density and not args.json:
        raise SharpscopeError("--density is a curve, not a table entry: give --json FILE for it")
    if args.correlate and len(args.checkpoints) < 3:
        raise SharpscopeError("--correlate needs at least 3 checkpoints")
    if args.scatter is not None:
        if not args.correlate:
            raise SharpscopeError("--scatter draws the --correlate result: give --correlate")
        figure_format(args.scatter)
        check_output_path(args.scatter, overwrite=args.overwrite, inputs=args.checkpoints)
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


def _measure_all(args: argparse.Namespace, settings: MeasureSettings, device) -> None:
    progress = not args.quiet and sys.stderr.isatty() and distributed.is_main_process()
    datasets: dict[str, Dataset] = {}  # checkpoints of one data set share it
    loaded = []
    for path in args.checkpoints:
        net, dataset, meta = load_model_and_data(
            path, device=device, datasets=datasets, **loading_from_args(args)
        )
        loss = checkpoint_loss(meta, path)
        check_model(net, dataset, settings, loss=loss, device=device)
        loaded.append((path, net, dataset, meta, loss))
    documents = [
        checkpoint_document(
            path, meta, measure(net, dataset, settings, loss=loss, device=device, progress=progress)
        )
        for path, net, dataset, meta, loss in loaded
    ]
    if distributed.is_main_process():
        labels = args.labels or [
            os.path.basename(os.path.dirname(os.path.abspath(p))) + "/" + os.path.basename(p)
            for p in args.checkpoints
        ]
        print(format_table(documents, labels))
        for label, doc in zip(labels, documents, strict=True):
            for note in doc.get("sampling", {}).get("notes", []):
                print(f"note: {label}: {note}")
        written = {"command": "measure", "labels": labels, "results": documents}
        if args.correlate:
            written["correlation"] = correlations(documents, seed=settings.seed)
            print(format_correlations(written["correlation"]))
            if args.scatter:
                plot_correlation(written["correlation"], args.scatter)
        if args.json:
            write_json(args.json, written)
