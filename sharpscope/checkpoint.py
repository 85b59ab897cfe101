"""Safe checkpoints: plain dicts of tensors and JSON-able values.

Format (docs/design.md, "Contracts")::

    {"format": "sharpscope-checkpoint", "version": 1,
     "model": {"name": ..., "kwargs": {...}},      # models.model_spec
     "data": {"name": ..., ...},                  # data.data_spec
     "config": {...},                             # the resolved training config
     "metrics": {...},                            # final metrics
     "state_dict": {name: tensor}}

Resume checkpoints add "resume": {"optimizer": ..., "step": ..., ...}. Everything
loads with ``torch.load(path, weights_only=True)``; a file that would need
arbitrary unpickling is refused, never run. Writes are atomic (temp file in the
same folder, fsync, rename), so a crash never leaves a truncated file.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from typing import Any

import torch
from torch import nn

from .errors import SharpscopeError, first_line
from .files import atomic_write
from .models import build_model, check_spec, model_spec
from .usercode import same_factory

FORMAT = "sharpscope-checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Atomically save ``payload`` (plain values and tensors only) with format tags."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file with ``weights_only=True``.

    Returns a sharpscope checkpoint dict, or ``{"state_dict": ...}`` for a plain
    state_dict saved elsewhere. Raises :class:`SharpscopeError` with one clear line
    for a missing file, a file that is not a torch checkpoint, or one that needs
    arbitrary unpickling.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise SharpscopeError(f"{path}: a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise SharpscopeError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise SharpscopeError(f"{path}: not a readable checkpoint (an empty file)")
    _check_archive(path)
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols: our error says it
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc) or "nsupported global" in str(exc):
            raise SharpscopeError(
                f"{path}: refusing to load, it needs arbitrary unpickling "
                "(only plain tensors and values load safely; re-save its state_dict)"
            ) from None
        raise SharpscopeError(
            f"{path}: not a readable checkpoint (not a torch.save file, or corrupt)"
        ) from None
    except Exception as exc:  # torch raises many types for garbage: KeyError, EOFError, ...
        first = first_line(exc)
        if isinstance(exc, RuntimeError) and "zip" in first.lower() or first.isdigit():
            first = "not a file written by torch.save"  # torch's words for text and garbage
        raise SharpscopeError(f"{path}: not a readable checkpoint ({first})") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        _check_fields(path, obj)
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": _state_dict(path, obj)}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return {"state_dict": _state_dict(path, obj["state_dict"])}
    raise SharpscopeError(f"{path}: not a sharpscope checkpoint or a state_dict")


def _check_archive(path: str) -> None:
    """Refuse a torch zip archive that would inflate beyond its size when loaded: torch.save
    stores its records uncompressed, so a compressed record (or one claiming more bytes
    than the file holds) can only be a file built to exhaust memory."""
    if not zipfile.is_zipfile(path):
        return  # torch's legacy format, or not a torch file: torch.load says which
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return
    if any(r.compress_type != zipfile.ZIP_STORED for r in records) or (
        sum(r.file_size for r in records) > size
    ):
        raise SharpscopeError(
            f"{path}: refusing to load, its records are compressed or larger than the file "
            "(torch.save never writes such a file)"
        )


# The entries of a sharpscope checkpoint and the type each must have.
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": dict,
    "data": (dict, type(None)),
    "config": dict,
    "metrics": dict,
    "resume": dict,
}


def _check_fields(path: str, obj: dict[str, Any]) -> None:
    """Refuse, in one line, a sharpscope checkpoint whose entries have the wrong types."""
    version = obj.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SharpscopeError(f"{path}: a damaged checkpoint (format version {version!r})")
    if version > VERSION:
        raise SharpscopeError(
            f"{path}: checkpoint version {version} is newer than this sharpscope "
            f"reads ({VERSION}); upgrade sharpscope"
        )
    if "state_dict" not in obj:
        raise SharpscopeError(f"{path}: a damaged checkpoint (no state_dict)")
    _state_dict(path, obj["state_dict"])
    for key, kind in _FIELDS.items():
        if key in obj and not isinstance(obj[key], kind):
            raise SharpscopeError(
                f"{path}: a damaged checkpoint ({key!r} is a {type(obj[key]).__name__})"
            )
    if "model" in obj:
        check_spec(obj["model"], f"{path}: a damaged checkpoint")


def _state_dict(path: str, state: Any) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise SharpscopeError(f"{path}: a damaged checkpoint (its state_dict is not name: tensor)")
    return state


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: str | dict[str, Any] | nn.Module | None = None,
    data: str | dict[str, Any] | None = None,
    data_dir: str | None = None,
    download: bool = False,
    trust_code: bool = False,
    device: str | torch.device = "cpu",
    **model_options: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved at ``path`` and return ``(model, metadata)``.

    A file is data, never code. The architecture a checkpoint records is built when it
    is a registry model; a factory it names (``module:factory``, ``file.py:factory``) is
    imported only if ``model`` names the same factory, or with ``trust_code=True``, and
    is then built with the keywords the checkpoint records (``model_options`` on top; a
    None value leaves a keyword out). Its data set must be a registry one, or ``data``
    names one (the user's own file, folder or factory a checkpoint records is opened only
    with ``trust_code``); the folder and download flag it records are ignored:
    ``data_dir`` and ``download`` are the caller's.

    For a plain state_dict name the architecture: a registry name or a factory (then
    ``data`` names the data set that fixes input shape and class count, and
    ``model_options`` go to the factory), a full model spec dict, or a module to load
    the weights into. ``metadata`` is the checkpoint without its
    ``state_dict``, with "model" and "data" filled in (the data spec the caller's
    folder and download flag apply to). The model is returned in eval mode on
    ``device``.
    """
    return _load(path, model, data, data_dir, download, trust_code, device, model_options)[:2]


def _load(path, model, data, data_dir, download, trust_code, device, model_options):
    """(model, metadata, the checkpoint's own data entry): :func:`load_checkpoint`'s work."""
    path = os.fspath(path)
    ckpt = read_checkpoint(path)
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "resume")}
    spec_of_data = _data_spec_for(path, ckpt, data, data_dir, download, trust_code)
    meta["data"] = spec_of_data
    if isinstance(model, nn.Module):
        net = model
    else:
        spec = _model_spec_for(path, ckpt, model, spec_of_data, model_options, trust_code)
        net = build_model(spec, weights=ckpt["state_dict"], source=path)
        meta["model"] = spec
    try:
        net.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise SharpscopeError(f"{path}: weights do not fit the model ({detail})") from None
    return net.to(device).eval(), meta, ckpt.get("data")


def _data_spec_for(path, ckpt, data, data_dir, download, trust_code) -> dict[str, Any] | None:
    """The data spec a checkpoint is evaluated on: the caller's, else the file's made
    safe (registry name, checked fields, the caller's folder and download flag; the
    user's own data only with ``trust_code``)."""
    from .data import data_spec, data_spec_from_file

    if isinstance(data, dict):
        return dict(data)
    if isinstance(data, str):
        return data_spec(data, data_dir=data_dir, download=download)
    if ckpt.get("data") is None:
        return None
    return data_spec_from_file(
        ckpt["data"], path, data_dir=data_dir, download=download, trust_code=trust_code
    )


def _model_spec_for(path, ckpt, model, data, options, trust_code) -> dict[str, Any]:
    if isinstance(model, dict):
        return model
    saved = ckpt.get("model")
    if model is None:
        if saved is None:
            raise SharpscopeError(
                f"{path}: a plain state_dict; name its architecture with --model "
                "(and --data for its input shape)"
            )
        check_trusted_model(saved["name"], path, trust_code=trust_code)
        kwargs = _recorded_kwargs(path, saved["name"], saved.get("kwargs", {}), options)
        return {"name": saved["name"], "kwargs": _overlay(kwargs, options)}
    if saved is not None and same_factory(saved["name"], model):
        # The user's name (the code that runs), with the keywords the checkpoint records.
        kwargs = _recorded_kwargs(path, model, saved.get("kwargs", {}), options)
        return {"name": model, "kwargs": _overlay(kwargs, options)}
    from .data import load_dataset

    if data is None:
        raise SharpscopeError(f"--model {model} needs --data to know the input shape and classes")
    ds = load_dataset(data)
    return model_spec(model, ds.input_shape, ds.num_classes, **options)


# Keywords of model factories that fetch or read files (torchvision's weights, timm's
# pretrained / checkpoint_path / pretrained_cfg_overlay, Hugging Face's cache_dir...): a
# file's record of them would make sharpscope download or open what the file says.
_FETCHING_KEYWORDS = ("weights", "pretrained", "download", "url", "cache", "checkpoint", "file")
_FETCHING_SUFFIXES = ("_path", "_dir", "_url", "_file")


def _fetches(key: str) -> bool:
    k = key.lower()
    return any(k.startswith(w) for w in _FETCHING_KEYWORDS) or k.endswith(_FETCHING_SUFFIXES)


def _recorded_kwargs(
    path: str, name: str, kwargs: dict[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
    """The keywords a checkpoint records for a user's factory, refusing any that could
    fetch or read files (the user may give such a keyword themselves, in ``options``)."""
    from .models import MODELS

    if name in MODELS:
        return dict(kwargs)
    for key, value in kwargs.items():
        if _fetches(key) and key not in options and value not in (None, False):
            raise SharpscopeError(
                f"{path} records {key}={value!r} for {name}, a keyword that can fetch or read "
                f"files: give it yourself (--model-kwargs '{{\"{key}\": ...}}', null to leave "
                "it out)"
            )
    return dict(kwargs)


def _overlay(kwargs: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``options`` on top; an option whose value is None removes its key."""
    merged = {**kwargs, **options}
    return {k: v for k, v in merged.items() if not (k in options and options[k] is None)}


def check_trusted_model(name: str, source: str, *, named: str | None = None, trust_code=False):
    """Refuse a model factory that a file names unless the user named the same one.

    Registry models are plain data; a ``module:factory`` or ``file.py:factory`` is code,
    imported and called only when the user asked for it: ``named`` (their own
    ``--model``) is the same factory (:func:`~sharpscope.usercode.same_factory`: the
    same name, or a file of the same name in another folder; the user's is the one that
    runs), or ``trust_code``. The message says how to ask.
    """
    from .models import MODELS

    if name in MODELS or trust_code or (named is not None and same_factory(named, name)):
        return
    raise SharpscopeError(
        f"{source} names the model factory {name!r}, which is code: sharpscope runs code "
        f"named in a file only when you name it too (--model {name}, or model= / "
        "trust_code=True in Python)"
    )


def load_model_and_data(
    path: str,
    *,
    model: str | None = None,
    data: str | dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    data_dir: str | None = None,
    download: bool = False,
    trust_code: bool = False,
    datasets: dict[str, Any] | None = None,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """``(model, dataset, metadata)`` rebuilt from checkpoint ``path``
    (:func:`~sharpscope.checkpoint.load_checkpoint`, :func:`~sharpscope.data.load_dataset`).

    For a plain state_dict, ``model`` (registry name or factory, with ``model_options``)
    and ``data`` name them. A factory the checkpoint itself names is run only when
    ``model`` names the same one, or with ``trust_code``; the user's own data (a file,
    folder or factory) it names is opened only when ``data`` names data (used instead;
    when the file then differs from the one the checkpoint records, by its SHA-256, a
    :class:`~sharpscope.errors.SharpscopeWarning` says so) or with ``trust_code``.
    ``data_dir`` and ``download`` say where CIFAR data lies and whether it may be
    fetched; a checkpoint's own records of either are ignored. ``datasets``, a dict kept
    between calls, lets checkpoints of one data set share it instead of loading it again.
    The data set's targets must suit the loss the checkpoint was trained with.
    """
    net, meta, recorded = _load(
        path, model, data, data_dir, download, trust_code, device, model_options or {}
    )
    from .data import check_loss_fits, load_dataset, warn_if_other_data

    spec = meta.get("data")
    if spec is None:
        raise SharpscopeError(f"{path}: no data set recorded; name one with --data")
    datasets = {} if datasets is None else datasets
    key = json.dumps(spec, sort_keys=True, default=str)
    if key not in datasets:
        datasets[key] = load_dataset(spec)
    dataset = datasets[key]
    if data is not None:
        warn_if_other_data(recorded, dataset.spec, path)
    check_loss_fits(dataset, checkpoint_loss(meta, path), path)
    meta["data"] = dict(dataset.spec)  # with what identifies the user's own data
    return net, dataset, meta


def checkpoint_loss(meta: dict[str, Any], source: str = "the checkpoint") -> str:
    """The loss a checkpoint was trained with (its config's "loss"; "ce" if none)."""
    from .losses import LOSSES

    loss = (meta.get("config") or {}).get("loss", "ce")
    if not isinstance(loss, str) or loss not in LOSSES:
        raise SharpscopeError(f"{source}: unknown loss {loss!r} in its config")
    return loss
