"""Safe checkpoints: plain dicts of tensors and JSON-able values.

Format (DESIGN.md, "Checkpoint")::

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

import os
import pickle
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import SharpscopeError, first_line
from .models import build_model, model_spec

FORMAT = "sharpscope-checkpoint"
VERSION = 1


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path``.

    The temp file lives in the destination folder so the rename is atomic; on any
    error it is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SharpscopeError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp makes the file 0600; give it the permissions open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
        if obj.get("version", 0) > VERSION:
            raise SharpscopeError(
                f"{path}: checkpoint version {obj['version']} is newer than this sharpscope "
                f"reads ({VERSION}); upgrade sharpscope"
            )
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": obj}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return {"state_dict": obj["state_dict"]}
    raise SharpscopeError(f"{path}: not a sharpscope checkpoint or a state_dict")


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: str | dict[str, Any] | nn.Module | None = None,
    data: str | dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    **model_options: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved at ``path`` and return ``(model, metadata)``.

    For a sharpscope checkpoint nothing else is needed. For a plain state_dict
    name the architecture: a registry name or ``package.module:factory`` (then
    ``data`` names the data set that fixes input shape and class count, and
    ``model_options`` go to the factory), a full model spec dict, or a module to
    load the weights into. ``metadata`` is the checkpoint without its
    ``state_dict``, with "model" and "data" filled in. The model is returned in
    eval mode on ``device``.
    """
    ckpt = read_checkpoint(path)
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "resume")}
    if isinstance(model, nn.Module):
        net = model
    else:
        spec = _model_spec_for(path, ckpt, model, data, model_options)
        net = build_model(spec)
        meta["model"] = spec
    if data is not None:
        from .data import data_spec

        meta["data"] = data_spec(data) if isinstance(data, str) else dict(data)
    try:
        net.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise SharpscopeError(f"{path}: weights do not fit the model ({detail})") from None
    return net.to(device).eval(), meta


def _model_spec_for(path, ckpt, model, data, options) -> dict[str, Any]:
    if isinstance(model, dict):
        return model
    if model is None:
        if "model" not in ckpt:
            raise SharpscopeError(
                f"{path}: a plain state_dict; name its architecture with --model "
                "(and --data for its input shape)"
            )
        spec = dict(ckpt["model"])
        if options:
            spec["kwargs"] = {**spec.get("kwargs", {}), **options}
        return spec
    saved = ckpt.get("model")
    if saved is not None and saved.get("name") == model and not options:
        return saved
    from .data import load_dataset

    if data is None and "data" not in ckpt:
        raise SharpscopeError(f"--model {model} needs --data to know the input shape and classes")
    ds = load_dataset(data if data is not None else ckpt["data"])
    return model_spec(model, ds.input_shape, ds.num_classes, **options)
