"""``sharpscope train``: SGD / SAM / ASAM / GSAM training into a run folder."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
from typing import Any

from .. import distributed
from ..devices import resolve_device
from ..errors import SharpscopeError
from ..losses import LOSSES
from ..train import NoResumePoint, load_run_config, train
from ..train_config import (
    AMP_MODES,
    DEFAULT_EPOCHS,
    LOCATION_FIELDS,
    OPTIMIZERS,
    SCHEDULES,
    WEIGHT_DECAY_MODES,
    TrainConfig,
)
from .common import (
    add_data_arguments,
    add_device_argument,
    add_model_arguments,
    given_options,
    seed_type,
)

_DEFAULTS = TrainConfig()

DESCRIPTION = """\
Train a model with SGD, SAM (Foret et al. 2021), ASAM (--adaptive, Kwon et al. 2021) or
GSAM (Zhuang et al. 2022) and write a run folder: config.json, metrics.jsonl (one JSON
object per line), checkpoint.pt (final; `sharpscope measure` reads it), resume.pt
(continue with --resume, bit-identical on the CPU) and, with --save-every,
trajectory/step_NNNNNNN.pt. With no options: a small CNN with SAM on scikit-learn's
digits, about 98% test accuracy in seconds on a CPU.

Several GPUs (or CPU processes, gloo) with PyTorch's DistributedDataParallel:

  torchrun --nproc_per_node N -m sharpscope train ... [--m-sharpness B/N] [--sync-bn]

(multi-node: torchrun's usual --nnodes / --rdzv-* flags). --batch-size is the global
batch B; each process takes B/N of it (the same examples as one process would see,
sliced). SAM's first pass is all-reduced, so every process climbs to the same w + eps:
the one-process SAM step on the global batch. With --m M (M dividing B/N; --m B/N is
the usual) each process takes its own eps from its own examples and that all-reduce is
skipped: Foret et al.'s per-accelerator SAM (m-sharpness), equal to a one-process run
with the same --m. (--m-sharpness is --m; torchrun's own parser refuses the short
spelling as an ambiguous abbreviation of its options.) Only rank 0 writes the run
folder; --resume works the same, with any N."""


def _batch_size(text: str) -> int | str:
    if text == "full":
        return "full"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'full', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _p_norm(text: str) -> float | str:
    if text.lower() in ("inf", "infinity"):
        return "inf"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or 'inf', got {text!r}") from None
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (or inf), got {text}")
    return value


# One add_argument per option, in the order --help lists them: long, but a list to read
# down, not logic (splitting it would scatter the options of one command).
def register(subparsers: Any) -> None:
    d = _DEFAULTS
    p = subparsers.add_parser(
        "train",
        help="train with SGD / SAM / ASAM / GSAM into a run folder",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_arguments(p)
    add_model_arguments(p)

    g = p.add_argument_group("optimizer")
    g.add_argument(
        "--optimizer", default=d.optimizer, choices=OPTIMIZERS, help="(default: %(default)s)"
    )
    g.add_argument(
        "--rho",
        type=float,
        default=d.rho,
        help="SAM radius (default: %(default)s, Foret et al. 2021); 0 reproduces SGD",
    )
    g.add_argument(
        "--sam-p",
        type=_p_norm,
        default=d.sam_p,
        metavar="P",
        help="norm of the SAM ball: 2, inf or any p >= 1 (default: 2)",
    )
    g.add_argument("--adaptive", action="store_true", help="ASAM: perturb relative to |w| + eta")
    g.add_argument("--eta", type=float, default=d.eta, help="ASAM offset (default: %(default)s)")
    g.add_argument(
        "--m",
        "--m-sharpness",
        dest="m",
        type=int,
        metavar="M",
        help="m-sharpness: each micro-batch of M examples gets its own perturbation "
        "(default: the whole batch). Under torchrun M must divide the per-process batch "
        "B/N: each process then keeps its own eps and skips the first-pass all-reduce. "
        "After torchrun write --m-sharpness: torchrun's parser rejects --m as an "
        "abbreviation of its --master-addr / --max-restarts / ...",
    )
    g.add_argument(
        "--sam-interval",
        type=int,
        default=d.sam_interval,
        metavar="K",
        help="a SAM step every K steps, plain steps between (default: %(default)s)",
    )
    g.add_argument(
        "--gsam-alpha",
        type=float,
        default=d.gsam_alpha,
        help="GSAM: weight of the orthogonal gradient (default: %(default)s)",
    )
    g.add_argument(
        "--gsam-rho-min",
        type=float,
        help="GSAM: rho at the lowest lr, rho scheduled with the lr (default: constant rho)",
    )
    g.add_argument("--lr", type=float, default=d.lr, help="learning rate (default: %(default)s)")
    g.add_argument(
        "--momentum", type=float, default=d.momentum, help="SGD momentum (default: %(default)s)"
    )
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    g.add_argument(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help="L2 weight decay (default: %(default)s)",
    )
    g.add_argument(
        "--weight-decay-mode",
        default=d.weight_decay_mode,
        choices=WEIGHT_DECAY_MODES,
        help="in the base optimizer at w (PyTorch ports), or in the loss so that it enters "
        "eps (official JAX code) (default: %(default)s)",
    )
    g.add_argument(
        "--label-smoothing",
        type=float,
        default=d.label_smoothing,
        help="(ce loss; default: %(default)s)",
    )
    g.add_argument(
        "--schedule",
        default=d.schedule,
        choices=SCHEDULES,
        help="learning-rate schedule; step: x0.2 at 30/60/80%% (default: %(default)s)",
    )
    g.add_argument(
        "--warmup", type=int, default=d.warmup, metavar="STEPS", help="linear warmup steps"
    )
    g.add_argument(
        "--grad-clip",
        type=float,
        metavar="NORM",
        help="clip the l2 norm of the gradient (the one at w + eps) to NORM",
    )

    g = p.add_argument_group("training")
    length = g.add_mutually_exclusive_group()
    length.add_argument(
        "--epochs", type=int, help=f"epochs (default: {DEFAULT_EPOCHS} unless --steps)"
    )
    length.add_argument("--steps", type=int, help="optimization steps instead of epochs")
    g.add_argument(
        "--batch-size",
        type=_batch_size,
        default=d.batch_size,
        help="examples per step, or 'full' for full-batch gradient descent (default: "
        "%(default)s; the last partial batch of an epoch is dropped). Under torchrun the "
        "global batch: each of the N processes takes B/N of it",
    )
    g.add_argument("--loss", default=d.loss, choices=LOSSES, help="(default: %(default)s)")
    g.add_argument("--seed", type=seed_type, default=d.seed, help="(default: %(default)s)")
    add_device_argument(g)
    g.add_argument(
        "--amp",
        default=d.amp,
        choices=AMP_MODES,
        help="mixed precision: bf16 autocast, or fp16 with a GradScaler; auto = bf16 on "
        "CUDA, none on the CPU (default: %(default)s)",
    )
    g.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun: synchronized BatchNorm (statistics of the global batch; "
        "CUDA only). Default: each process normalizes with its own batch's statistics",
    )
    g.add_argument(
        "--eval-every", type=int, default=d.eval_every, metavar="N", help="test every N epochs"
    )
    g.add_argument(
        "--eval-batch-size",
        type=int,
        default=d.eval_batch_size,
        help="(default: %(default)s)",
    )

    g = p.add_argument_group("tracking")
    g.add_argument(
        "--track-every",
        type=int,
        metavar="N",
        help="every N steps log the top Hessian eigenvalue to metrics.jsonl",
    )
    g.add_argument(
        "--track-sharpness",
        action="store_true",
        help="with --track-every: also worst-case l2 sharpness at --rho",
    )
    g.add_argument(
        "--track-samples",
        type=int,
        default=d.track_samples,
        metavar="N",
        help="training examples tracked (a fixed subset; default: %(default)s)",
    )

    g = p.add_argument_group("output")
    g.add_argument("--out", help="run folder (default: runs/DATA-MODEL-OPTIMIZER)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from resume.pt")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    g.add_argument(
        "--save-every",
        type=int,
        metavar="N",
        help="keep a checkpoint every N steps in OUT/trajectory (with step 0 and the last)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="N",
        help="write resume.pt every N steps (default: every epoch, at most every 10 s)",
    )
    g.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run, _parser=p)


def _default_out(args: argparse.Namespace) -> str:
    from ..models import DEFAULT_MODEL

    model = args.model or DEFAULT_MODEL.get(args.data, "mlp")
    return os.path.join("runs", f"{_slug(args.data)}-{_slug(model)}-{args.optimizer}")


def _slug(name: str) -> str:
    """A name as a part of a folder name: a file's or folder's name without its suffix
    (mydata.npz -> mydata, path/to/net.py:make -> net-make)."""
    head, colon, attr = name.rpartition(":") if ":" in name else (name, "", "")
    stem = os.path.basename(head.rstrip("/")) or head
    if os.path.splitext(stem)[1].lower() in (".py", ".npz", ".pt", ".pth"):
        stem = os.path.splitext(stem)[0]
    return (stem + ("-" + attr if colon else "")).replace(".", "-").replace("/", "-")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` the command-line options describe."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    return TrainConfig(**{n: getattr(args, n) for n in names})


def resume_config(out: str, args: argparse.Namespace) -> TrainConfig:
    """The configuration ``--resume`` continues: the saved run's, with the options the
    command line writes out on top (a requeued job reruns its whole command: options
    equal to the saved ones are fine, train() refuses one that differs). A folder with
    no resume point yet: the command line's own configuration, started afresh."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in given_options(args._parser, args._argv).items() if k in names}
    try:
        # A model factory the file names is imported only if the command line names it,
        # and the user's own data it names is read only if the command line names data.
        saved = load_run_config(
            out, model=given.get("model"), data=given.get("data"), quiet=args.quiet
        )
    except NoResumePoint:
        return config_from_args(args)
    location = {name: getattr(args, name) for name in LOCATION_FIELDS}
    return dataclasses.replace(saved, **{**given, **location})


def run(args: argparse.Namespace) -> int:
    if args.out is not None and not args.out.strip():
        raise SharpscopeError("--out is empty: give a folder")
    out = args.out or _default_out(args)
    try:
        if args.resume:
            # Rank 0 alone opens the run folder (its lock) and hands the configuration out.
            if distributed.launched_by_torchrun():
                distributed.init_from_environment(resolve_device(args.device))
            config = distributed.on_main(lambda: resume_config(out, args))
        else:
            config = config_from_args(args)
        train(config, out, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)
    except SharpscopeError:
        if int(os.environ.get("RANK", "0")) != 0:
            # Every process raises the same error (train() hands rank 0's out): rank 0
            # prints it; the others only exit with its status.
            raise SystemExit(2) from None
        raise
    finally:
        if distributed.launched_by_torchrun():
            # After an error the trainer (its DDP reducer) can linger in a reference
            # cycle through the traceback; outliving the process group, it aborts the
            # process at exit.
            gc.collect()
            distributed.shutdown()
    return 0
