"""The user's own code: the factories ``--model`` and ``--data`` name.

A factory is named ``module:factory`` (a module importable from the working folder, as
``python -m`` would find it, or from the installed packages) or ``path/to/file.py:factory``
(a Python file, loaded by its path under a module name of its own). Importing and
calling it runs the user's code, so this module is reached only for names the user gave
on the command line or in Python: a name read from a file is checked against those first
(``checkpoint.check_trusted_model``, ``data.check_trusted_data``).

Everything that goes wrong in the user's code (a missing file, an exception or
``sys.exit`` while importing, an attribute that is not callable, an exception in the
factory) is one :class:`~sharpscope.errors.SharpscopeError` line that says where.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from .errors import SharpscopeError, first_line

# module:factory, or path/to/file.py:factory (the path may hold anything but a newline).
_FACTORY = re.compile(
    r"^(?:(?P<file>[^\n]+\.py)|(?P<module>[A-Za-z_][\w.]*)):(?P<attr>[A-Za-z_]\w*)$"
)


def parse_factory(name: Any) -> tuple[str, str, str] | None:
    """``("file", path, attr)`` or ``("module", module, attr)`` for a factory name, None
    for anything else."""
    if not isinstance(name, str):
        return None
    match = _FACTORY.match(name)
    if match is None:
        return None
    if match["file"] is not None:
        return "file", match["file"], match["attr"]
    return "module", match["module"], match["attr"]


def is_factory(name: Any) -> bool:
    """Whether ``name`` has the form of a factory (``module:factory`` or ``file.py:factory``)."""
    return parse_factory(name) is not None


def same_factory(a: Any, b: Any) -> bool:
    """Whether two names mean the same factory: the same text, or two ``file.py:factory``
    names of the same file name and factory (a checkpoint records the path as it was
    given where it was trained; the folder it is named from may differ). Only ever used
    to recognize a name the user gave: the code that runs is the user's name's."""
    if a == b:
        return True
    pa, pb = parse_factory(a), parse_factory(b)
    if pa is None or pb is None or pa[0] != "file" or pb[0] != "file":
        return False
    return pa[2] == pb[2] and os.path.basename(pa[1]) == os.path.basename(pb[1])


def resolve_factory(name: str, option: str) -> Callable[..., Any]:
    """The callable ``name`` names (imported now); ``option`` (``--model``, ``--data``)
    is how errors refer to it."""
    parsed = parse_factory(name)
    if parsed is None:
        raise SharpscopeError(f"{option} {name}: not of the form module:factory or file.py:factory")
    kind, target, attr = parsed
    module = _load_file(target, name, option) if kind == "file" else _import(target, name, option)
    factory = getattr(module, attr, None)
    if not callable(factory):
        where = target if kind == "file" else repr(target)
        raise SharpscopeError(f"{where} has no callable {attr!r} for {option} {name}")
    return factory


def call(factory: Callable[..., Any], what: str, **kwargs: Any) -> Any:
    """``factory(**kwargs)``, with an exception in the user's code as one line that names
    ``what`` and the line of the user's file it came from."""
    try:
        return factory(**kwargs)
    except SharpscopeError:
        raise
    except Exception as exc:
        raise SharpscopeError(f"{what} failed: {describe(exc, factory)}") from None
    except SystemExit as exc:
        raise SharpscopeError(f"{what} called sys.exit({exc.code!r})") from None


def describe(exc: BaseException, source: Any = None) -> str:
    """``Type: first line`` of ``exc``, with ``(at FILE line N)`` for the last frame of the
    traceback in the file that defines ``source`` (a function or module), if any."""
    text = f"{type(exc).__name__}: {first_line(exc)}"
    path = _source_file(source)
    if path is None:
        return text
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _same_path(f.filename, path)]
    if frames:
        text += f" (at {os.path.basename(path)} line {frames[-1].lineno})"
    return text


def _source_file(source: Any) -> str | None:
    if isinstance(source, str):
        return source
    code = getattr(source, "__code__", None) or getattr(
        getattr(source, "__init__", None), "__code__", None
    )
    return getattr(code, "co_filename", None) or getattr(source, "__file__", None)


def _same_path(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


@contextlib.contextmanager
def _on_path(folder: str) -> Iterator[None]:
    """``folder`` first on sys.path meanwhile (as ``python -m`` puts the working folder,
    and ``python file.py`` the file's), then removed again."""
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        if sys.path and sys.path[0] == folder:
            del sys.path[0]
        elif folder in sys.path:
            sys.path.remove(folder)


def _import(module_name: str, name: str, option: str) -> ModuleType:
    try:
        with _on_path(os.getcwd()):
            return importlib.import_module(module_name)
    except ImportError as exc:
        raise SharpscopeError(f"cannot import {module_name!r} for {option} {name}: {exc}") from None
    except Exception as exc:  # the module's own code failed while importing
        module_file = getattr(sys.modules.get(module_name), "__file__", None)
        raise SharpscopeError(
            f"importing {module_name!r} for {option} {name} failed: {describe(exc, module_file)}"
        ) from None
    except SystemExit as exc:
        raise SharpscopeError(
            f"importing {module_name!r} for {option} {name} called sys.exit({exc.code!r}) "
            "(is it a script? put its work under `if __name__ == '__main__':`)"
        ) from None


def _load_file(path: str, name: str, option: str) -> ModuleType:
    """The Python file at ``path`` as a module, under a name of its own (derived from
    its real path and modification time, so one file loads once and an edited one anew);
    its folder is importable while it runs, as for ``python file.py``."""
    if os.path.isdir(path):
        raise SharpscopeError(f"{path}: a folder, not a Python file ({option} {name})")
    if not os.path.isfile(path):
        raise SharpscopeError(f"{path}: no such file ({option} {name})")
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = f"{real}\0{stat.st_mtime_ns}\0{stat.st_size}".encode()
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(real))[0])
    module_name = f"_sharpscope_user_{stem}_{hashlib.sha256(key).hexdigest()[:16]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, real)
    if spec is None or spec.loader is None:
        raise SharpscopeError(f"{path}: cannot be loaded as Python ({option} {name})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # as import does: dataclasses and pickle look here
    try:
        with _on_path(os.path.dirname(real)):
            spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[module_name]
        if isinstance(exc, KeyboardInterrupt):
            raise
        if isinstance(exc, SystemExit):
            raise SharpscopeError(
                f"loading {path} for {option} {name} called sys.exit({exc.code!r}) "
                "(is it a script? put its work under `if __name__ == '__main__':`)"
            ) from None
        if not isinstance(exc, Exception):
            raise
        raise SharpscopeError(
            f"loading {path} for {option} {name} failed: {describe(exc, real)}"
        ) from None
    return module
