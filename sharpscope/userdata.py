"""The user's own data sets: ``.npz`` and ``.pt`` files, image folders and factories.

``--data NAME`` (:func:`sharpscope.data.load_dataset`) reads, besides the registry's:

- ``NAME.npz``: arrays ``x_train``, ``y_train`` and optionally ``x_test``, ``y_test`` and
  ``num_classes``, read with ``allow_pickle=False``, their sizes taken from the ``.npy``
  headers before anything is read;
- ``NAME.pt`` (or ``.pth``): a dict of tensors with the same keys, read with
  ``torch.load(weights_only=True)``;
- a folder in torchvision's ``ImageFolder`` layout (one subfolder of images per class,
  or ``train/`` and ``test/`` (or ``val/``) folders of that layout), read with
  torchvision;
- ``module:factory`` or ``path/to/file.py:factory``, called with no arguments: a
  :class:`~sharpscope.data.Dataset`, a dict as a ``.pt`` file holds, a map-style data
  set of ``(x, y)`` items (such as a ``torch.utils.data.TensorDataset``), or a
  ``(train, test)`` pair of them.

Like every data set (:mod:`sharpscope.data`), it is held in memory as tensors, at most
:data:`MAX_DATA_BYTES`, refused before it is read where the size can be told first.
Inputs that are floats or booleans become float32, integers int64 (token ids). Integer
targets are class indices (classification: ``num_classes`` is the largest plus one, or
the ``num_classes`` entry); float targets, of shape (n,) or (n, k), are regression
targets (the loss must then be ``mse``). Without a test split a fixed 20% of the training
examples (a seed-0 permutation, as for digits) is held out as the test split.

The spec of a loaded set records what identifies it: a file's size and SHA-256
(``bytes``, ``sha256``); for a folder or a factory the SHA-256 of its tensors
(``tensors_sha256``). A data set named in a file is never opened from here unless the
user names it (``data.check_trusted_data``).
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import SharpscopeError, first_line
from .files import npz_headers, open_npz
from .usercode import call, describe, parse_factory, resolve_factory

SOURCES = ("npz", "pt", "folder", "factory")
KEYS = ("x_train", "y_train", "x_test", "y_test", "num_classes")
# The most a user's data set may take in memory, as sharpscope holds it (float32 inputs,
# int64 class indices): CIFAR-100 takes 0.6 GiB, Tiny ImageNet 4.6 GiB.
MAX_DATA_BYTES = 16 * 2**30
# The most classes a classification set may have (ImageNet-21k has 21,841; a language
# model's vocabulary is below 2^18).
MAX_CLASSES = 2**20
# The share of the examples held out as the test split when a data set has none.
HELD_OUT = 0.2


def source_of(name: str) -> str:
    """What kind of data ``--data NAME`` names, from the name alone."""
    if parse_factory(name) is not None:
        return "factory"
    suffix = os.path.splitext(name)[1].lower()
    if suffix == ".npz":
        return "npz"
    if suffix in (".pt", ".pth"):
        return "pt"
    return "folder"


def load_user_data(spec: dict[str, Any]) -> Any:
    """The :class:`~sharpscope.data.Dataset` ``spec`` names (``{"name", "source", ...}``)."""
    from .data import DATASETS, Dataset

    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise SharpscopeError(f"bad data set name {name!r}")
    source = spec.get("source") or source_of(name)
    if source not in SOURCES or source != source_of(name):
        raise SharpscopeError(f"data set {name!r}: bad source {source!r}")
    identity: dict[str, Any] = {}
    augment = None
    if source in ("npz", "pt"):
        _check_file(name, DATASETS)
        size = os.path.getsize(name)
        if source == "npz":
            entries = _read_npz(name)
        else:
            entries = _read_pt(name, size)
        identity = {"bytes": size, "sha256": file_sha256(name)}
    elif source == "folder":
        entries, classes = _read_folder(name, DATASETS)
        identity = {"classes": classes}
    else:
        entries, augment = _from_factory(name)
    x_tr, y_tr, x_te, y_te, num_classes, task = _assemble(entries, name)
    held_out = x_te is None
    if held_out:
        x_tr, y_tr, x_te, y_te = _hold_out(x_tr, y_tr, name)
    ds = Dataset(name, x_tr, y_tr, x_te, y_te, num_classes, augment, task=task)
    if source in ("folder", "factory"):
        identity["tensors_sha256"] = tensors_sha256(ds)
    ds.spec = {
        "name": name,
        "source": source,
        "train_subset": spec.get("train_subset"),
        "task": task,
        "held_out_test": held_out,
        **identity,
    }
    return ds


# -- reading --------------------------------------------------------------------------------
def _check_file(path: str, registry: Sequence[str]) -> None:
    if os.path.isdir(path):
        raise SharpscopeError(f"{path}: a folder, not a data file")
    if not os.path.exists(path):
        raise SharpscopeError(f"{path}: no such file (--data takes {_what_data(registry)})")
    if not os.path.isfile(path):
        raise SharpscopeError(f"{path}: not a regular file")


def _what_data(registry: Sequence[str]) -> str:
    return (
        f"{', '.join(registry)}, a .npz or .pt file, an image folder, module:factory or "
        "file.py:factory"
    )


def file_sha256(path: str) -> str:
    """The SHA-256 of the file at ``path``, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_sha256(ds: Any) -> str:
    """The SHA-256 of a data set's four tensors (their dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for t in (ds.train_x, ds.train_y, ds.test_x, ds.test_y):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def _held_bytes(shape: Sequence[int], dtype: np.dtype) -> int:
    """What an array takes as sharpscope holds it (int64 integers, float32 floats), or as
    stored if that is more."""
    held = 8 if dtype.kind in "iu" else 4
    return math.prod(shape) * max(held, dtype.itemsize)


def _too_large(name: str, size: int) -> SharpscopeError:
    return SharpscopeError(
        f"{name}: the data set would take {size / 2**30:.3g} GiB in memory, more than "
        f"{MAX_DATA_BYTES / 2**30:g} GiB (sharpscope holds data sets in memory as tensors)"
    )


def _read_npz(path: str) -> dict[str, Any]:
    loaded = open_npz(path, "a data file of named arrays")
    try:
        with loaded as f:
            total = 0
            for member, shape, dtype in npz_headers(f):
                if dtype.hasobject:
                    raise SharpscopeError(
                        f"{path}: {member} holds Python objects, which sharpscope does not "
                        "unpickle: store numbers"
                    )
                total += _held_bytes(shape, dtype)
            if total > MAX_DATA_BYTES:  # from the headers, before reading
                raise _too_large(path, total)
            _check_keys(path, f.files)
            return {k: f[k] for k in f.files}
    except SharpscopeError:
        raise
    except Exception as exc:  # a damaged zip or .npy
        raise SharpscopeError(f"{path}: not a readable .npz file ({first_line(exc)})") from None


def _check_keys(path: str, keys: Sequence[str]) -> None:
    unknown = sorted(set(keys) - set(KEYS))
    if unknown:
        raise SharpscopeError(
            f"{path}: unknown entries {', '.join(map(repr, unknown))} (a data file holds "
            f"{', '.join(KEYS[:4])} and optionally num_classes)"
        )


def _read_pt(path: str, size: int) -> dict[str, Any]:
    from .checkpoint import _check_archive

    if size > MAX_DATA_BYTES:  # torch.save stores tensors uncompressed: the file's size
        raise _too_large(path, size)
    _check_archive(path)  # a compressed record could inflate far beyond the file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SharpscopeError(
            f"{path}: refusing to load, it needs arbitrary unpickling (save a dict of "
            "plain tensors)"
        ) from None
    except Exception as exc:
        raise SharpscopeError(f"{path}: not a readable .pt file ({first_line(exc)})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise SharpscopeError(
            f"{path}: holds a {type(obj).__name__}, not a dict of tensors ({', '.join(KEYS[:4])})"
        )
    _check_keys(path, list(obj))
    return obj


IMAGE_SPLITS = (("train", "test"), ("train", "val"))


def _read_folder(path: str, registry: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise SharpscopeError(
                f"{path}: not a data file sharpscope reads (.npz, .pt) nor a folder"
            )
        raise SharpscopeError(
            f"unknown data set {path!r}: no such file or folder (--data takes "
            f"{_what_data(registry)})"
        )
    try:
        from torchvision import datasets, transforms
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        raise SharpscopeError(
            f"{path}: reading an image folder needs torchvision: pip install "
            f"'sharpscope[vision]' (importing it failed: {first_line(exc)})"
        ) from None
    for train, test in IMAGE_SPLITS:
        if os.path.isdir(os.path.join(path, train)) and os.path.isdir(os.path.join(path, test)):
            roots = [os.path.join(path, train), os.path.join(path, test)]
            break
    else:
        roots = [path]
    folders = []
    for root in roots:
        try:
            folders.append(datasets.ImageFolder(root, transform=transforms.ToTensor()))
        except Exception as exc:  # no class folders, no images in one
            raise SharpscopeError(f"{root}: not an image folder ({first_line(exc)})") from None
    classes = list(folders[0].classes)
    entries = {}
    for folder, split in zip(folders, ("train", "test"), strict=False):
        remap = None
        if folder is not folders[0]:  # the test split's class indices, by name
            extra = sorted(set(folder.classes) - set(classes))
            if extra:
                raise SharpscopeError(
                    f"{roots[1]}: classes {', '.join(extra[:3])} are not in {roots[0]}"
                )
            remap = [classes.index(c) for c in folder.classes]
        x, y = _stack(folder, f"{roots[0] if split == 'train' else roots[1]}", images=True)
        if remap is not None:
            y = torch.tensor(remap, dtype=torch.int64)[y]
        entries[f"x_{split}"], entries[f"y_{split}"] = x, y
    entries["num_classes"] = len(classes)
    return entries, classes


def _from_factory(name: str) -> tuple[dict[str, Any], str | None]:
    from .data import Dataset

    factory = resolve_factory(name, "--data")
    result = call(factory, f"data factory {name!r}")
    where = f"data factory {name!r}"
    if isinstance(result, Dataset):
        if result.augment not in (None, "crop_flip"):
            raise SharpscopeError(f"{where}: unknown augmentation {result.augment!r}")
        if result.augment == "crop_flip" and result.train_x.dim() != 4:
            raise SharpscopeError(f"{where}: crop_flip augments images (n, C, H, W) only")
        entries = {
            "x_train": result.train_x,
            "y_train": result.train_y,
            "x_test": result.test_x,
            "y_test": result.test_y,
            "num_classes": result.num_classes,
        }
        return entries, result.augment
    if isinstance(result, dict):
        _check_keys(where, [str(k) for k in result])
        return result, None
    if _is_pair(result):
        x_tr, y_tr = _stack(result[0], f"{where}, train")
        x_te, y_te = _stack(result[1], f"{where}, test")
        return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}, None
    if _map_style(result):
        x, y = _stack(result, where)
        return {"x_train": x, "y_train": y}, None
    raise SharpscopeError(
        f"{where} returned a {type(result).__name__}: return a sharpscope Dataset, a dict "
        f"of tensors ({', '.join(KEYS[:4])}), a map-style data set of (x, y) items, or a "
        "(train, test) pair of them"
    )


def _map_style(obj: Any) -> bool:
    return (
        hasattr(obj, "__len__")
        and hasattr(obj, "__getitem__")
        and not isinstance(obj, torch.Tensor | np.ndarray | dict | str | bytes)
    )


def _is_item(obj: Any) -> bool:
    """An ``(x, y)`` example: a pair whose x is a tensor, an array or a number."""
    return (
        isinstance(obj, tuple | list)
        and len(obj) == 2
        and isinstance(obj[0], torch.Tensor | np.ndarray | int | float)
    )


def _is_pair(obj: Any) -> bool:
    """A (train, test) pair of data sets (not a data set of two examples)."""
    return (
        isinstance(obj, tuple | list)
        and len(obj) == 2
        and all(_map_style(part) and not _is_item(part) for part in obj)
    )


def _stack(ds: Any, where: str, images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The items of map-style data set ``ds`` stacked into (inputs, targets) tensors."""
    getitem = type(ds).__getitem__
    try:
        n = len(ds)
    except Exception as exc:
        raise SharpscopeError(f"{where}: len() failed: {describe(exc, type(ds).__len__)}") from None
    if not isinstance(n, int) or n < 1:
        raise SharpscopeError(f"{where}: holds no examples (len {n!r})")

    def item(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            got = ds[i]
        except Exception as exc:
            raise SharpscopeError(f"{where}: item {i} failed: {describe(exc, getitem)}") from None
        if not (isinstance(got, tuple | list) and len(got) == 2):
            raise SharpscopeError(
                f"{where}: item {i} is a {type(got).__name__}, not an (x, y) pair"
            )
        try:
            return torch.as_tensor(got[0]), torch.as_tensor(got[1])
        except Exception as exc:
            raise SharpscopeError(
                f"{where}: item {i} is not a pair of tensors, arrays or numbers ({first_line(exc)})"
            ) from None

    x0, y0 = item(0)
    held = 8 if not (x0.is_floating_point() or x0.dtype == torch.bool) else 4
    estimate = n * (max(x0.numel(), 1) * max(held, x0.element_size()) + 8 * max(y0.numel(), 1))
    if estimate > MAX_DATA_BYTES:  # before the items are read
        raise _too_large(where, estimate)
    xs, ys = [x0], [y0]
    for i in range(1, n):
        x, y = item(i)
        if x.shape != x0.shape or y.shape != y0.shape:
            what = "images" if images else "items"
            path = ""
            if images and hasattr(ds, "samples"):
                path = f" ({ds.samples[i][0]})"
            raise SharpscopeError(
                f"{where}: {what} of different shapes: {tuple(x0.shape)} and {tuple(x.shape)} "
                f"at item {i}{path}" + ("; resize the images to one size first" if images else "")
            )
        xs.append(x)
        ys.append(y)
    try:
        return torch.stack(xs), torch.stack(ys)
    except (RuntimeError, TypeError) as exc:
        raise SharpscopeError(f"{where}: items cannot be stacked ({first_line(exc)})") from None


# -- checking and converting ------------------------------------------------------------------
def _tensor(value: Any, key: str, where: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise SharpscopeError(f"{where}: {key} holds {_kind_words(value.dtype.kind)}")
        value = torch.from_numpy(np.ascontiguousarray(value))
    elif not isinstance(value, torch.Tensor):
        raise SharpscopeError(
            f"{where}: {key} is a {type(value).__name__}, not an array or a tensor"
        )
    if value.layout != torch.strided or value.is_quantized or value.device.type != "cpu":
        raise SharpscopeError(f"{where}: {key} is not a plain dense tensor")
    if value.is_complex():
        raise SharpscopeError(f"{where}: {key} holds complex numbers")
    return value


def _kind_words(kind: str) -> str:
    return {
        "O": "Python objects, which sharpscope does not unpickle",
        "U": "text",
        "S": "bytes",
        "c": "complex numbers",
        "M": "dates",
        "m": "time spans",
    }.get(kind, "records, not numbers")


def _inputs(x: torch.Tensor, key: str, where: str) -> torch.Tensor:
    if x.dim() == 0:
        raise SharpscopeError(f"{where}: {key} is a single number, not one row per example")
    if x.dim() == 1:
        x = x.unsqueeze(1)  # one feature per example
    if x.is_floating_point() or x.dtype == torch.bool:
        x = x.to(torch.float32)
        if not torch.isfinite(x).all():
            raise SharpscopeError(f"{where}: {key} holds NaN or infinite values")
        return x.contiguous()
    return x.to(torch.int64).contiguous()  # token ids, for an embedding


def _targets(y: torch.Tensor, key: str, where: str) -> torch.Tensor:
    if y.dtype == torch.bool:
        raise SharpscopeError(f"{where}: {key} holds booleans: store class indices as integers")
    if y.is_floating_point():
        if y.dim() not in (1, 2):
            raise SharpscopeError(
                f"{where}: {key} has shape {tuple(y.shape)}: regression targets are (n,) or (n, k)"
            )
        y = y.to(torch.float32)
        if not torch.isfinite(y).all():
            raise SharpscopeError(f"{where}: {key} holds NaN or infinite values")
        return y.contiguous()
    if y.dim() != 1:
        raise SharpscopeError(
            f"{where}: {key} has shape {tuple(y.shape)}: class indices are one integer per "
            "example, shape (n,)"
        )
    y = y.to(torch.int64)
    if len(y) and (y.min() < 0 or y.max() >= MAX_CLASSES):
        raise SharpscopeError(
            f"{where}: {key} holds class indices outside 0 .. {MAX_CLASSES - 1} "
            f"({int(y.min())} .. {int(y.max())})"
        )
    return y.contiguous()


def _assemble(entries: dict[str, Any], where: str) -> tuple:
    """(x_train, y_train, x_test or None, y_test or None, num_classes, task), checked."""
    for key in ("x_train", "y_train"):
        if key not in entries:
            raise SharpscopeError(f"{where}: no {key} in it (a data set needs x_train, y_train)")
    if ("x_test" in entries) != ("y_test" in entries):
        raise SharpscopeError(f"{where}: x_test and y_test go together: give both or neither")
    splits = ["train"] + (["test"] if "x_test" in entries else [])
    x, y = {}, {}
    for split in splits:
        kx, ky = f"x_{split}", f"y_{split}"
        x[split] = _inputs(_tensor(entries[kx], kx, where), kx, where)
        y[split] = _targets(_tensor(entries[ky], ky, where), ky, where)
        if len(x[split]) != len(y[split]):
            raise SharpscopeError(
                f"{where}: {len(x[split])} inputs but {len(y[split])} targets in the {split} split"
            )
        if len(x[split]) == 0:
            raise SharpscopeError(f"{where}: the {split} split holds no examples")
    if "test" in x:
        if x["test"].shape[1:] != x["train"].shape[1:] or x["test"].dtype != x["train"].dtype:
            raise SharpscopeError(
                f"{where}: x_test is {_describe(x['test'])}, x_train {_describe(x['train'])}"
            )
        if y["test"].dtype != y["train"].dtype or y["test"].shape[1:] != y["train"].shape[1:]:
            raise SharpscopeError(
                f"{where}: y_test is {_describe(y['test'])}, y_train {_describe(y['train'])}"
            )
    size = sum(t.numel() * t.element_size() for t in (*x.values(), *y.values()))
    if size > MAX_DATA_BYTES:
        raise _too_large(where, size)
    task = "regression" if y["train"].is_floating_point() else "classification"
    given = entries.get("num_classes")
    if task == "regression":
        if given is not None:
            raise SharpscopeError(
                f"{where}: num_classes is for integer class targets; its targets are floats "
                "(regression)"
            )
        num_classes = 1 if y["train"].dim() == 1 else y["train"].shape[1]
    else:
        needed = max(int(t.max()) for t in y.values()) + 1
        num_classes = needed if given is None else _count(given, where)
        if num_classes < needed:
            raise SharpscopeError(
                f"{where}: num_classes is {num_classes}, but its targets go up to {needed - 1}"
            )
    return x["train"], y["train"], x.get("test"), y.get("test"), num_classes, task


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} of shape {tuple(t.shape)}"


def _count(value: Any, where: str) -> int:
    if isinstance(value, np.ndarray | torch.Tensor) and value.ndim == 0:
        value = value.item()
    if isinstance(value, np.integer):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_CLASSES:
        raise SharpscopeError(
            f"{where}: num_classes must be a whole number in 1 .. {MAX_CLASSES}, got {value!r}"
        )
    return value


def _hold_out(x: torch.Tensor, y: torch.Tensor, where: str) -> tuple[torch.Tensor, ...]:
    """A fixed share of the examples as the test split (a seed-0 permutation)."""
    n = len(y)
    if n < 2:
        raise SharpscopeError(f"{where}: one example, and no test split to evaluate on")
    n_test = max(1, round(HELD_OUT * n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    test, train = perm[:n_test].sort().values, perm[n_test:].sort().values
    return x[train], y[train], x[test], y[test]
