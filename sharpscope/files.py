"""Files: atomic writes, JSON and JSON Lines, exclusive locks, and the clean-up of the
temporary files that a killed write leaves behind.

Every file sharpscope writes goes through :func:`atomic_write`: the bytes go to a
temporary file in the destination folder, named after the destination
(``.tmp-NAME-XXXXXXXX``), which is flushed to disk and renamed onto the destination.
A crash leaves either the old file or the new one, never a mix; what it can leave is
the temporary file, which :func:`remove_stale_temporaries` deletes on the next start.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from .errors import SharpscopeError

TMP_PREFIX = ".tmp-"
# The lock file of a folder that one process writes at a time (a run folder, compare's).
LOCK_NAME = ".sharpscope.lock"


def _tmp_prefix(path: str) -> str:
    return f"{TMP_PREFIX}{os.path.basename(path)}-"


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path``.

    The temp file lives in the destination folder so the rename is atomic; on any
    error it is removed and ``path`` is left as it was. A full disk (or a file-size
    limit) is reported as :class:`SharpscopeError` in one line, whatever the writer
    raised (torch.save says "unexpected pos").
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SharpscopeError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_tmp_prefix(path))
    os.close(fd)
    try:
        try:
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as exc:
            raise SharpscopeError(f"cannot write {path}: {_disk_words(exc, folder)}") from None
        except RuntimeError as exc:
            # torch.save reports a failed write (a full disk, a file-size limit) as a
            # RuntimeError naming a zip offset: "unexpected pos ...".
            text = str(exc)
            if not any(sign in text for sign in _TORCH_WRITE_FAILURES):
                raise
            raise SharpscopeError(f"cannot write {path}: {_disk_words(exc, folder)}") from None
        # mkstemp makes the file 0600; give it the permissions open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def _disk_words(exc: BaseException, folder: str) -> str:
    """A failed write in words, with the free space when the disk is (nearly) full."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else "the write failed"
    try:
        stat = os.statvfs(folder)
        free = stat.f_bavail * stat.f_frsize
    except OSError:
        return text
    if free < 64 * 2**20:
        return f"{text} (the disk is full: {free // 2**20} MiB free)"
    if not isinstance(exc, OSError):
        return f"{text} (a full disk or a file-size limit)"
    return text


def remove_stale_temporaries(path: str | os.PathLike, *, name_pattern: bool = False) -> list[str]:
    """Delete the temporary files that killed writes of ``path`` left beside it; returns
    their paths. Only files named for ``path`` are touched (``.tmp-NAME-`` and mkstemp's
    8 characters): another program's, or another output's, stay. With ``name_pattern``
    the file name of ``path`` is a glob pattern (``trajectory/step_*.pt``)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    prefix = glob.escape(TMP_PREFIX) + (name if name_pattern else glob.escape(name))
    removed = []
    for stale in glob.glob(os.path.join(glob.escape(folder), prefix + "-" + "?" * 8)):
        if os.path.isfile(stale) and not os.path.islink(stale):
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)
                removed.append(stale)
    return removed


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, tuples by lists: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | os.PathLike, document: dict[str, Any]) -> None:
    """Atomically write ``document`` as indented JSON."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(document, f, indent=2, allow_nan=True)
            f.write("\n")

    atomic_write(path, write)


def write_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Atomically write ``records``, one JSON object per line."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            for record in records:
                f.write(json.dumps(record, allow_nan=True) + "\n")

    atomic_write(path, write)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text``."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


@contextlib.contextmanager
def exclusive_lock(lock_path: str, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created, and removed on release) or
    refuse at once with one line naming ``what`` and the process holding it.

    An advisory ``flock``: every sharpscope process that writes ``what`` takes it, and
    the kernel releases it when its holder dies, so a killed run never blocks the next.
    Where ``fcntl`` does not exist (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    for _ in range(10):
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            by = f" (process {holder})" if holder.isdigit() else ""
            raise SharpscopeError(
                f"{what} is in use by another sharpscope process{by}; wait for it to finish"
            ) from None
        # The previous holder may have removed the file between our open and our lock:
        # then we hold a lock on a file nobody else can see, and must start over.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:  # pragma: no cover - ten lost races in a row
        raise SharpscopeError(f"could not lock {what}: try again")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock_path)
        os.close(fd)


def open_npz(path: str, what: str) -> Any:
    """``numpy.load`` of ``path`` as an .npz of named arrays, pickles refused; anything
    else (not a zip of .npy arrays, one bare .npy array) is refused in one line saying
    that ``path`` is not ``what``. Use the result in a ``with`` block."""
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception:
        raise SharpscopeError(f"{path}: not {what} (not a .npz, a zip of .npy arrays)") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise SharpscopeError(f"{path}: not {what} (a single .npy array, not a .npz)")
    return loaded


def npz_headers(f: Any) -> Iterator[tuple[str, tuple[int, ...], Any]]:
    """(member name, shape, dtype) of every member of an open ``numpy.load`` .npz file,
    read from the .npy headers without reading the arrays. Every member counts: numpy
    may read a member named ``NAME`` for the key ``NAME`` rather than ``NAME.npy``."""
    import numpy as np

    for name in f.zip.namelist():
        with f.zip.open(name) as member:
            version = np.lib.format.read_magic(member)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(member)
        yield name, shape, dtype
