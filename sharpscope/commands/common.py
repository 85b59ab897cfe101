"""Option groups shared by several subcommands, and their resolution."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any, TypeVar

from ..data import DATASETS
from ..errors import SharpscopeError
from ..models import ACTIVATIONS, merge_model_options
from ..settings import SPLITS, EvaluationSettings

S = TypeVar("S")


DATA_HELP = (
    f"{', '.join(DATASETS)}; or your own: a .npz or .pt file (x_train, y_train, "
    "optionally x_test, y_test, num_classes), an image folder (one subfolder per class; "
    "needs torchvision), or module:factory / path/to/file.py:factory"
)
MODEL_HELP = (
    "mlp, cnn, cnn1d, resnet18, wrn; or your own: module:factory (importable from the "
    "working folder or installed, e.g. torchvision.models:resnet18, timm:create_model) "
    "or path/to/file.py:factory"
)


def json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object (``--model-kwargs '{"width": 8}'``)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"width\": 8}}', got {text!r}"
        )
    return value


def add_model_kwargs_argument(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--model-kwargs",
        type=json_object,
        metavar="JSON",
        help="more keywords for the model's factory, as a JSON object, e.g. "
        "'{\"num_classes\": 10}'; they add to or replace the ones sharpscope passes "
        "(num_classes, input_shape where the factory names them); null leaves one out",
    )


def add_data_arguments(parser: argparse.ArgumentParser, default: str | None = "digits") -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        default=default,
        metavar="DATA",
        help=f"{DATA_HELP} (default: {default or 'the checkpoint’s'})",
    )
    group.add_argument("--data-dir", help="folder holding CIFAR data (cifar10 / cifar100)")
    group.add_argument("--download", action="store_true", help="download CIFAR if missing")
    group.add_argument(
        "--train-subset", type=int, metavar="N", help="use N training examples (a fixed subset)"
    )
    group.add_argument(
        "--label-noise",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="replace this fraction of the training labels by other classes, one fixed draw "
        "for every seed (symmetric noise, Foret et al. 2021, Table 4; default: 0)",
    )


def add_model_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=default,
        help=f"{MODEL_HELP} (default: cnn for digits, cnn1d for mnist1d, resnet18 for CIFAR, "
        "mlp for synthetic and your own data)",
    )
    group.add_argument("--width", type=int, help="width (units, channels or WRN widen factor)")
    group.add_argument("--depth", type=int, help="depth (hidden layers, conv layers or WRN depth)")
    group.add_argument(
        "--activation", choices=tuple(ACTIVATIONS), help="activation (mlp, cnn, cnn1d)"
    )
    add_model_kwargs_argument(group)


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """How to rebuild a checkpoint: the user's own names for its code and its data.

    A checkpoint is data: the model factory it names runs only if ``--model`` names the
    same one, the user's own data it names is read only if ``--data`` names data, and
    CIFAR data is read from ``--data-dir`` (never from a folder the file names) and
    fetched only with ``--download``.
    """
    group = parser.add_argument_group(
        "rebuilding a checkpoint",
        "A checkpoint names its architecture and data set. A registry model is built as "
        "recorded; a model factory it names (module:factory, file.py:factory) is code, "
        "imported only if --model names the same factory, and built with the keywords the "
        "checkpoint records. Your own data a checkpoint names (a file, folder or factory) "
        "is read only if --data names it; a file whose SHA-256 differs from the recorded "
        "one is used with a warning. Data folders and downloads recorded in a file are "
        "never used: CIFAR is read from --data-dir, fetched only with --download.",
    )
    group.add_argument(
        "--model",
        help=f"a plain state_dict's architecture ({MODEL_HELP}), or the factory a "
        "checkpoint names, to allow running it",
    )
    group.add_argument("--width", type=int, help="plain state_dict: width of --model")
    group.add_argument("--depth", type=int, help="plain state_dict: depth of --model")
    group.add_argument(
        "--activation", choices=tuple(ACTIVATIONS), help="plain state_dict: activation"
    )
    add_model_kwargs_argument(group)
    group.add_argument(
        "--data",
        metavar="DATA",
        help=f"the data set to evaluate on (default: the checkpoint's): {DATA_HELP}",
    )
    group.add_argument("--data-dir", help="folder holding CIFAR data (cifar10 / cifar100)")
    group.add_argument(
        "--download", action="store_true", help="download CIFAR into --data-dir if missing"
    )


def loading_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The keywords of :func:`~sharpscope.checkpoint.load_model_and_data` the options of
    :func:`add_checkpoint_arguments` give."""
    flags = {"width": args.width, "depth": args.depth, "activation": args.activation}
    options = merge_model_options(flags, args.model_kwargs)
    return {
        "model": args.model,
        "model_options": options,
        "data": args.data,
        "data_dir": args.data_dir,
        "download": args.download,
    }


def add_evaluation_arguments(parser: argparse.ArgumentParser, samples: int | None = None) -> None:
    """Which examples an analysis evaluates L(w) on (:class:`EvaluationSettings`);
    ``samples`` replaces its default number of examples."""
    d = EvaluationSettings()
    samples = d.samples if samples is None else samples
    group = parser.add_argument_group("evaluation data")
    group.add_argument(
        "--split",
        default=d.split,
        choices=SPLITS,
        help=f"split to evaluate on (default: {d.split})",
    )
    group.add_argument(
        "--samples",
        type=int,
        default=samples,
        metavar="N",
        help=f"number of examples, a fixed seeded subset (default: {samples}, or all if fewer)",
    )
    group.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"examples per forward pass (default: {d.batch_size})",
    )


def settings_from_args(kind: type[S], args: argparse.Namespace, **options: str) -> S:
    """The ``kind`` settings the parsed options give: every field from the option of
    its name, or of the name ``options`` maps it to (``rhos="rho"``); fields without an
    option keep their defaults. Checked on construction, before any work."""
    values = {}
    for f in dataclasses.fields(kind):  # type: ignore[arg-type]
        name = options.get(f.name, f.name)
        if hasattr(args, name):
            values[f.name] = getattr(args, name)
    return kind(**values)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N"
    )


def check_output_path(path: str, *, overwrite: bool = True, inputs: Sequence[str] = ()) -> None:
    """Refuse, before any work is done, an output path that cannot or must not be written.

    Refused: a folder, a path in a missing or unwritable folder, one of the command's
    ``inputs`` (even with --overwrite), and, unless ``overwrite``, an existing file.
    """
    if not path.strip():
        raise SharpscopeError("an output path is empty: give a file name")
    target = os.path.abspath(path)
    folder = os.path.dirname(target)
    if os.path.isdir(target):
        raise SharpscopeError(f"cannot write {path}: it is a folder")
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise SharpscopeError(f"cannot write {path}: {folder} is a file, not a folder")
        raise SharpscopeError(f"cannot write {path}: folder {folder} does not exist")
    try:  # a real probe: permission bits say nothing to root, nor about /proc
        fd, probe = tempfile.mkstemp(prefix=".sharpscope-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise SharpscopeError(f"cannot write {path}: {exc.strerror or exc}") from None
    if os.path.exists(target):
        for source in inputs:
            if os.path.exists(source) and os.path.samefile(source, target):
                raise SharpscopeError(f"{path} is an input of this command: refusing to write it")
        if not overwrite:
            raise SharpscopeError(f"{path} exists: pass --overwrite to replace it")


def add_overwrite_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--overwrite", action="store_true", help=f"replace {what} if it exists (default: refuse)"
    )


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, Any]:
    """The options of ``parser`` that ``argv`` writes out (whatever their values, a
    default's included), parsed; the ones left to their defaults are absent."""
    defaults = {action: action.default for action in parser._actions}
    try:
        for action in defaults:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(list(argv))
    finally:
        for action, default in defaults.items():
            action.default = default
    return vars(given)


def seed_type(text: str) -> int:
    """An argparse type: a seed in 0 .. 2^63 - 1 (what every generator here takes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in 0 .. 2^63 - 1, got {value}")
    return value
