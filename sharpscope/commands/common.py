"""Option groups shared by several subcommands, and their resolution."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import torch

from ..checkpoint import atomic_write
from ..data import DATASETS, data_spec
from ..errors import SharpscopeError
from ..models import ACTIVATIONS


def add_data_arguments(parser: argparse.ArgumentParser, default: str | None = "digits") -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        default=default,
        choices=DATASETS,
        help=f"data set (default: {default or 'the checkpoint’s'})",
    )
    group.add_argument("--data-dir", help="folder holding CIFAR data (cifar10 / cifar100)")
    group.add_argument("--download", action="store_true", help="download CIFAR if missing")
    group.add_argument(
        "--train-subset", type=int, metavar="N", help="use N training examples (a fixed subset)"
    )


def add_model_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=default,
        help="mlp, cnn, cnn1d, resnet18, wrn, or package.module:factory for your own "
        "(default: cnn for digits, cnn1d for mnist1d, resnet18 for CIFAR, mlp for synthetic)",
    )
    group.add_argument("--width", type=int, help="width (units, channels or WRN widen factor)")
    group.add_argument("--depth", type=int, help="depth (hidden layers, conv layers or WRN depth)")
    group.add_argument(
        "--activation", choices=tuple(ACTIVATIONS), help="activation (mlp, cnn, cnn1d)"
    )


def add_evaluation_arguments(parser: argparse.ArgumentParser, samples: int | None = 1024) -> None:
    """Which examples an analysis evaluates L(w) on."""
    group = parser.add_argument_group("evaluation data")
    group.add_argument(
        "--split",
        default="train",
        choices=("train", "test"),
        help="split to evaluate on (default: train)",
    )
    group.add_argument(
        "--samples",
        type=int,
        default=samples,
        metavar="N",
        help=f"number of examples, a fixed seeded subset (default: {samples}, or all if fewer)",
    )
    group.add_argument(
        "--batch-size", type=int, default=512, help="examples per forward pass (default: 512)"
    )


def data_spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return data_spec(
        args.data, train_subset=args.train_subset, data_dir=args.data_dir, download=args.download
    )


def model_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The model options the user gave (None for those left to the architecture)."""
    return {"width": args.width, "depth": args.depth, "activation": args.activation}


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N"
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; refuse CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SharpscopeError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SharpscopeError("--device cuda asked for, but no CUDA device is available")
    return device


def write_json(path: str, document: dict[str, Any]) -> None:
    """Atomically write ``document`` as indented JSON."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(document, f, indent=2, allow_nan=True)
            f.write("\n")

    atomic_write(path, write)


def check_output_path(path: str, *, overwrite: bool = True, inputs: Sequence[str] = ()) -> None:
    """Refuse, before any work is done, an output path that cannot or must not be written.

    Refused: a folder, a path in a missing or unwritable folder, one of the command's
    ``inputs`` (even with --overwrite), and, unless ``overwrite``, an existing file.
    """
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
