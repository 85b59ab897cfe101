"""The run folder of ``sharpscope train``: what is in it, who may write it, how a run
that ``--overwrite`` replaces is set aside and put back, and the signals that stop a run.

A run folder ``OUT`` holds::

    config.json  metrics.jsonl  checkpoint.pt  resume.pt  trajectory/step_NNNNNNN.pt

and, while a process works in it, ``.sharpscope.lock`` (one process per run folder);
while an ``--overwrite`` run is under way, the run it replaces in ``.replaced-run/``.

No kill, at any moment, loses a run:

* every file is written atomically (:mod:`sharpscope.files`); the temporary files of
  killed writes are deleted on the next start;
* setting the old run aside moves its files (and a run it was itself replacing, in its
  own ``.replaced-run``) into ``.replaced-run.moving/``, then renames that folder to
  ``.replaced-run``: the rename is the one step that commits. Putting it back renames
  ``.replaced-run`` to ``.replaced-run.moving`` and moves the files out. So
  ``.replaced-run.moving`` always holds what belongs in ``OUT``, and the next start puts
  it there, finishing a put-back or undoing a set-aside that a kill cut short;
* ``.replaced-run`` is deleted only once the run that replaces it has completed (renamed
  to ``.replaced-run.deleting`` first, so that a deletion cut short is finished, never
  mistaken for a run);
* only files that are demonstrably a run's are ever deleted: the leftovers of a start
  killed before its first resume point are recognized by their ``config.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .errors import SharpscopeError
from .files import LOCK_NAME, exclusive_lock, remove_stale_temporaries

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "resume.pt")
TRAJECTORY = "trajectory"
REPLACED = ".replaced-run"  # the old run, while the run replacing it is under way
MOVING = ".replaced-run.moving"  # files on their way in or out: they belong in OUT
DELETING = ".replaced-run.deleting"  # a replaced run on its way out for good
_OURS = (*RUN_FILES, TRAJECTORY, LOCK_NAME, REPLACED, MOVING, DELETING)


def _note(message: str) -> None:
    print(f"sharpscope train: {message}", file=sys.stderr)


class RunFolder:
    """The run folder at ``path``; every method but :meth:`locked` expects the lock.
    ``say`` prints the notes on what a start found and did (default: stderr)."""

    def __init__(self, path: str | os.PathLike, say: Callable[[str], None] = _note):
        self.path = os.fspath(path)
        self.say = say

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

    def has_resume_point(self) -> bool:
        return os.path.isfile(self._at("resume.pt"))

    def holds_run(self) -> bool:
        """A run that got as far as its first resume point (or finished)."""
        return self.has_resume_point() or os.path.isfile(self._at("checkpoint.pt"))

    def _set_aside_exists(self) -> bool:
        return os.path.isdir(self._at(REPLACED))

    def _killed_start(self) -> bool:
        """Run files without a resume point, written by a start killed before it got
        one: recognized by a config.json that is a training configuration."""
        if self.holds_run() or not self.run_file_names():
            return False
        path = self._at("config.json")
        if not os.path.isfile(path) or os.path.getsize(path) > 2**20:
            return False
        from .train_config import config_from_dict  # (train.py imports this module)

        try:
            with open(path) as f:
                config_from_dict(json.load(f))
        except (OSError, ValueError, SharpscopeError):
            return False
        return True

    def _foreign(self) -> list[str]:
        """Entries that are neither run files nor this module's own."""
        return [n for n in os.listdir(self.path) if n not in _OURS]

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
        """Finish what a killed process left half done: delete the temporary files of
        its writes, move what a set-aside or put-back left in ``.replaced-run.moving``
        back into the folder, and finish deleting a replaced run whose replacement
        completed."""
        for name in RUN_FILES:
            remove_stale_temporaries(self._at(name))
        remove_stale_temporaries(self._at(TRAJECTORY, "step_*.pt"), name_pattern=True)
        if os.path.isdir(self._at(MOVING)):
            self._move_back()
        if os.path.isdir(self._at(DELETING)):
            shutil.rmtree(self._at(DELETING))
        if self._set_aside_exists() and self._complete():
            self.finish()

    def _complete(self) -> bool:
        """Whether the run in the folder has completed (its resume point says so)."""
        from .checkpoint import read_checkpoint

        if not self.has_resume_point():
            return False
        try:
            state = read_checkpoint(self._at("resume.pt")).get("resume")
        except SharpscopeError:
            return False
        return isinstance(state, dict) and state.get("complete") is True

    def _move_back(self) -> None:
        """Move everything in ``.replaced-run.moving`` back where it belongs."""
        moving = self._at(MOVING)
        for name in self.run_file_names(moving):
            os.makedirs(os.path.dirname(self._at(name)), exist_ok=True)
            os.replace(os.path.join(moving, name), self._at(name))
        if os.path.isdir(os.path.join(moving, REPLACED)):  # the run it was replacing
            os.rename(os.path.join(moving, REPLACED), self._at(REPLACED))
        shutil.rmtree(moving)

    # -- starting --------------------------------------------------------------------
    def resumable(self) -> bool:
        """Whether the folder holds a resume point to continue from. A run set aside by
        an ``--overwrite`` whose replacement never reached a resume point is put back
        first: the replacement held nothing, the set-aside run is what there is."""
        if not self.has_resume_point() and self._set_aside_exists():
            self.put_back()
            self.say(
                f"{self.path}: the run started by --overwrite never reached a resume "
                "point; the run it was replacing is back"
            )
        return self.has_resume_point()

    def start_mode(self, resume: bool, overwrite: bool) -> str:
        """ "resume" (continue from resume.pt) or "fresh" (start at step 0), or a
        refusal, for a run started with these flags on what the folder holds."""
        if resume and overwrite:
            raise SharpscopeError("--resume and --overwrite exclude each other")
        if not (self.holds_run() or self._set_aside_exists() or self._killed_start()) and (
            self.run_file_names() or self._foreign()
        ):
            raise SharpscopeError(
                f"{self.path} exists, is not empty and is not a sharpscope run folder; "
                "choose another --out"
            )
        if resume:
            if self.resumable():
                return "resume"
            if self.holds_run():
                raise SharpscopeError(
                    f"{self.path} holds a finished run without its resume point (resume.pt): "
                    "nothing to continue; --overwrite replaces it"
                )
            self.say(f"{self.path}: no resume point yet; starting the run from the beginning")
            return "fresh"
        if overwrite:
            return "fresh"
        if self.holds_run():
            raise SharpscopeError(
                f"{self.path} holds a run already: pass --resume to continue it "
                "or --overwrite to replace it"
            )
        if self._set_aside_exists():
            raise SharpscopeError(
                f"{self.path} holds a run set aside by an interrupted --overwrite "
                f"({REPLACED}/): --overwrite replaces it, --resume puts it back"
            )
        if self.run_file_names():
            self.say(f"{self.path}: a run stopped before its first resume point; starting again")
        return "fresh"

    def begin_fresh(self, overwrite: bool) -> None:
        """Make room for a run starting at step 0, just before it writes its first file:
        with ``overwrite`` a run in the folder is set aside; anything else there is what
        a start killed before its first resume point left (:meth:`start_mode` made sure),
        and goes."""
        if overwrite and self.holds_run():
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
        """Move the run into ``.replaced-run``, with any run it was itself replacing
        inside: first into ``.replaced-run.moving``, then one rename commits. Signals
        are delivered after the move."""
        moving = self._at(MOVING)
        with signals_held():
            os.makedirs(moving)
            for name in self.run_file_names():
                os.makedirs(os.path.dirname(os.path.join(moving, name)), exist_ok=True)
                os.replace(self._at(name), os.path.join(moving, name))
            if self._set_aside_exists():
                os.rename(self._at(REPLACED), os.path.join(moving, REPLACED))
            self._remove_empty_trajectory(self.path)
            os.rename(moving, self._at(REPLACED))

    def put_back(self) -> bool:
        """Delete the run files in the folder and put the run set aside back (one
        rename commits, as in :meth:`set_aside`). Returns whether there was one."""
        with signals_held():
            self.clear()
            if not self._set_aside_exists():
                return False
            os.rename(self._at(REPLACED), self._at(MOVING))
            self._move_back()
            return True

    def set_aside_path(self) -> str | None:
        """Where the replaced run is kept, if one is."""
        return self._at(REPLACED) if self._set_aside_exists() else None

    def finish(self) -> None:
        """The run in the folder has completed: the run it replaced goes for good."""
        if self._set_aside_exists():
            os.rename(self._at(REPLACED), self._at(DELETING))
            shutil.rmtree(self._at(DELETING))


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
    """SIGINT and SIGTERM held back meanwhile (in the main thread), and delivered once
    the block is done: for file moves that a Ctrl-C must not cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, frame: pending.append(signum))
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        if pending:
            signal.raise_signal(pending[0])
