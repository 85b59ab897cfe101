"""The run folder of ``sharpscope train``: what is in it, who may write it, how a run
that ``--overwrite`` replaces is set aside and put back, and the signals that stop a run.

A run folder ``OUT`` holds::

    config.json  metrics.jsonl  checkpoint.pt  resume.pt  trajectory/step_NNNNNNN.pt

and, while a process works in it, ``.sharpscope.lock`` (one process per run folder);
while an ``--overwrite`` run is under way, the run it replaces in ``.replaced-run/``.

No kill, at any moment, loses a run:

* every file is written atomically (:mod:`sharpscope.files`); the temporary files of
  killed writes are deleted on the next start;
* setting the old run aside moves its files into ``.replaced-run.moving/`` and then
  renames that folder to ``.replaced-run``: the rename is the one step that commits.
  Putting it back renames ``.replaced-run`` to ``.replaced-run.moving`` and moves the
  files out. So ``.replaced-run.moving`` always holds files that belong in ``OUT``, and
  the next start moves them there, finishing a put-back or undoing a set-aside that a
  kill cut short;
* ``.replaced-run`` is deleted only once the run that replaces it has completed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from typing import Any

from .errors import SharpscopeError
from .files import LOCK_NAME, TMP_PREFIX, exclusive_lock, remove_all_temporaries

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "resume.pt")
TRAJECTORY = "trajectory"
REPLACED = ".replaced-run"  # the old run, while the run replacing it is under way
MOVING = ".replaced-run.moving"  # files on their way in or out: they belong in OUT


class RunFolder:
    """The run folder at ``path``; every method but :meth:`locked` expects the lock."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def _at(self, *names: str) -> str:
        return os.path.join(self.path, *names)

    # -- what is in it ---------------------------------------------------------------
    def run_file_names(self, where: str | None = None) -> list[str]:
        """The run files present in ``where`` (default: the folder), relative to it:
        RUN_FILES and the trajectory's step checkpoints, never anything else."""
        where = where or self.path
        names = [n for n in RUN_FILES if os.path.isfile(os.path.join(where, n))]
        traj = os.path.join(where, TRAJECTORY)
        if os.path.isdir(traj):
            names += [
                os.path.join(TRAJECTORY, n)
                for n in sorted(os.listdir(traj))
                if n.startswith("step_") and n.endswith(".pt")
            ]
        return names

    def _foreign(self) -> list[str]:
        """Entries that are neither run files nor this module's own."""
        ours = {*RUN_FILES, TRAJECTORY, LOCK_NAME, REPLACED, MOVING}
        return [n for n in os.listdir(self.path) if n not in ours and not n.startswith(TMP_PREFIX)]

    def has_resume_point(self) -> bool:
        return os.path.isfile(self._at("resume.pt"))

    # -- the lock ----------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[RunFolder]:
        """Create the folder if need be, hold its lock, and finish what a killed process
        left half done (:meth:`recover`). On the way out, remove the folder (and any
        parents made for it) if this process made it and it is empty."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise SharpscopeError(f"{self.path} exists and is not a folder")
        made = None
        if not os.path.isdir(self.path):
            made = os.path.abspath(self.path)
            while not os.path.exists(os.path.dirname(made)):
                made = os.path.dirname(made)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise SharpscopeError(f"cannot make folder {self.path}: {exc.strerror}") from None
        try:
            with exclusive_lock(self._at(LOCK_NAME), f"run folder {self.path}"):
                self.recover()
                yield self
        finally:
            folder = os.path.abspath(self.path)
            while made is not None and os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
                if folder == made:
                    break
                folder = os.path.dirname(folder)

    def recover(self) -> None:
        """Delete temporary files of killed writes, and move back into the folder what
        a set-aside or put-back cut short left in ``.replaced-run.moving``."""
        remove_all_temporaries(self.path)
        remove_all_temporaries(self._at(TRAJECTORY))
        moving = self._at(MOVING)
        if os.path.isdir(moving):
            self._move_files(moving, self.path)
            shutil.rmtree(moving)

    def _move_files(self, source: str, target: str) -> None:
        """Move every run file of ``source`` into ``target`` (replacing what is there)."""
        for name in self.run_file_names(source):
            os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
            os.replace(os.path.join(source, name), os.path.join(target, name))

    # -- starting --------------------------------------------------------------------
    def start_mode(self, resume: bool, overwrite: bool, say) -> str:
        """ "resume" (continue from resume.pt) or "fresh" (start at step 0), or a
        refusal, for a run started with these flags on what the folder holds.

        A folder whose run never reached its first resume point (killed during its
        first writes) holds nothing of value: the same command starts it again.
        """
        if resume and overwrite:
            raise SharpscopeError("--resume and --overwrite exclude each other")
        files = self.run_file_names()
        aside = os.path.isdir(self._at(REPLACED))
        if not files and not aside and self._foreign():
            raise SharpscopeError(
                f"{self.path} exists, is not empty and is not a sharpscope run folder; "
                "choose another --out"
            )
        finished = os.path.isfile(self._at("checkpoint.pt"))
        if resume:
            if self.has_resume_point():
                return "resume"
            if finished:
                raise SharpscopeError(
                    f"{self.path} holds a finished run without its resume point (resume.pt): "
                    "nothing to continue; --overwrite replaces it"
                )
            say(f"{self.path}: no resume point yet; starting the run from the beginning")
            return "fresh"
        if overwrite:
            return "fresh"
        if self.has_resume_point() or finished:
            raise SharpscopeError(
                f"{self.path} holds a run already: pass --resume to continue it "
                "or --overwrite to replace it"
            )
        if aside:
            raise SharpscopeError(
                f"{self.path} holds a run set aside by an interrupted --overwrite "
                f"({REPLACED}/): pass --overwrite to replace it, or --resume"
            )
        if files:
            say(f"{self.path}: a run stopped before its first resume point; starting it again")
        return "fresh"

    def begin_fresh(self, overwrite: bool) -> None:
        """Make room for a run starting at step 0, just before it writes its first file:
        with ``overwrite``, set the old run aside (unless an interrupted replacement
        already did); any other run files are what a run killed before its first
        resume point left, and go."""
        if overwrite and not os.path.isdir(self._at(REPLACED)) and self.run_file_names():
            self.set_aside()
        else:
            self.clear()

    def clear(self) -> None:
        """Delete the run files (and only those) from the folder."""
        for name in self.run_file_names():
            os.remove(self._at(name))
        self._remove_empty_trajectory(self.path)

    @staticmethod
    def _remove_empty_trajectory(where: str) -> None:
        traj = os.path.join(where, TRAJECTORY)
        if os.path.isdir(traj) and not os.listdir(traj):
            os.rmdir(traj)

    def set_aside(self) -> None:
        """Move the run into ``.replaced-run``: the files into ``.replaced-run.moving``,
        then one rename commits. Signals wait meanwhile."""
        moving = self._at(MOVING)
        with signals_held():
            os.makedirs(moving, exist_ok=True)
            self._move_files(self.path, moving)
            self._remove_empty_trajectory(self.path)
            os.rename(moving, self._at(REPLACED))

    def put_back(self) -> bool:
        """After a failed fresh run: delete its files and put the run it replaced back
        (one rename commits, as in :meth:`set_aside`). Returns whether there was one."""
        with signals_held():
            self.clear()
            if not os.path.isdir(self._at(REPLACED)):
                return False
            os.rename(self._at(REPLACED), self._at(MOVING))
            self.recover()
            return True

    def set_aside_path(self) -> str | None:
        """Where the replaced run is kept, if one is."""
        return self._at(REPLACED) if os.path.isdir(self._at(REPLACED)) else None

    def finish(self) -> None:
        """The run in the folder has completed: the run it replaced goes for good."""
        if os.path.isdir(self._at(REPLACED)):
            shutil.rmtree(self._at(REPLACED))


# -- signals -------------------------------------------------------------------------------
class StopRequest:
    """Set by the first SIGINT or SIGTERM during training: the loop saves a resume point
    at the end of the current step and stops (a second signal stops at once)."""

    def __init__(self) -> None:
        self.signal: int | None = None


@contextlib.contextmanager
def stop_on_signals(enabled: bool) -> Iterator[StopRequest]:
    stop = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.signal is not None:
            raise KeyboardInterrupt
        stop.signal = signum

    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        current = signal.getsignal(s)
        if current in (signal.SIG_IGN, None):  # ignored by the parent, or not Python's
            continue
        previous[s] = signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            if h is not None:
                signal.signal(s, h)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM ignored meanwhile (in the main thread): for file moves that a
    second Ctrl-C must not cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            if h is not None:
                signal.signal(s, h)
