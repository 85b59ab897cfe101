"""Faults that must never lose or strand a run: SIGKILL at every move of a set-aside or
a put-back and during a run's first writes, two processes on one run folder, a full
disk during torch.save, and a requeued job rerunning its own command line.

The kills are real: a subprocess runs the command with the run folder's (or the file
writer's) ``os`` wrapped so that its k-th move is a SIGKILL to itself. What the next
command finds is exactly what a kill at that instant leaves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sharpscope.checkpoint import read_checkpoint
from sharpscope.cli import main
from sharpscope.errors import SharpscopeError
from sharpscope.files import LOCK_NAME, exclusive_lock
from tests.cli_utils import exit2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "synthetic", "--train-subset", "64", "--model", "mlp", "--width", "8"]
TINY += ["--depth", "1", "--batch-size", "16"]
OLD = [*TINY, "--epochs", "1", "--save-every", "2", "--quiet"]  # 4 run files, 3 trajectory
NEW = [*TINY, "--epochs", "2", "--seed", "1", "--quiet"]
DIVERGING = [*TINY, "--epochs", "1", "--lr", "1e12", "--momentum", "0", "--schedule", "constant"]
DIVERGING += ["--quiet"]

# Runs ``sharpscope ARGS`` with MODULE's ``os`` wrapped: its KILL_AT-th replace or rename
# (counting from 0) is a SIGKILL of the process, before the move happens.
KILLER = r"""
import importlib, os, signal, sys
module = importlib.import_module(os.environ["KILL_MODULE"])
kill_at = int(os.environ["KILL_AT"])
moves = 0

class KillingOs:
    def __getattr__(self, name):
        return getattr(os, name)

    def _move(self, move, a, b):
        global moves
        if moves == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        moves += 1
        return move(a, b)

    def replace(self, a, b):
        return self._move(os.replace, a, b)

    def rename(self, a, b):
        return self._move(os.rename, a, b)

module.os = KillingOs()
from sharpscope.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _killed(argv: list[str], module: str, kill_at: int) -> int:
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.update(KILL_MODULE=module, KILL_AT=str(kill_at))
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, *argv], env=env, cwd=REPO, capture_output=True, text=True
    )
    return proc.returncode


def _files(folder) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != LOCK_NAME
    }


def _same_weights(a, b) -> None:
    wa, wb = read_checkpoint(a)["state_dict"], read_checkpoint(b)["state_dict"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A finished run and its files, byte for byte."""
    folder = tmp_path_factory.mktemp("old") / "run"
    assert main(["train", *OLD, "--out", str(folder)]) == 0
    (folder / "notes.txt").write_text("mine")  # not a run file: never touched
    return folder, _files(folder)


@pytest.fixture(scope="module")
def new_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", *NEW, "--out", str(folder)]) == 0
    return folder / "checkpoint.pt"


def _copy(files: dict[str, bytes], folder) -> None:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


# 7 files of the old run: kills 0..7 fall in the set-aside (7 moves and the commit
# rename), 8..15 in the put-back of a diverged replacement (its rename and 7 moves).
SET_ASIDE_KILLS = [0, 1, 6, 7]
PUT_BACK_KILLS = [8, 9, 15]
ALL_KILLS = [k for k in range(16) if k not in SET_ASIDE_KILLS + PUT_BACK_KILLS]


@pytest.mark.parametrize(
    "kill_at",
    SET_ASIDE_KILLS + PUT_BACK_KILLS + [pytest.param(k, marks=pytest.mark.slow) for k in ALL_KILLS],
)
def test_a_kill_at_any_move_of_an_overwrite_loses_nothing(old_run, tmp_path, capsys, kill_at):
    source, files = old_run
    out = tmp_path / "run"
    _copy(files, out)
    argv = ["train", *DIVERGING, "--out", str(out), "--overwrite"]
    assert _killed(argv, "sharpscope.runfolder", kill_at) == -signal.SIGKILL
    # What a user would type next: neither may lose the old run. --resume continues what
    # the folder holds: the old run (put back if the replacement never got anywhere).
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert _files(out) == files
    # The killed command again: the replacement diverges, and the old run comes back.
    assert main(argv) == 2
    assert "diverged" in capsys.readouterr().err
    assert _files(out) == files
    assert sorted(os.listdir(out)) == sorted(os.listdir(source))


def test_a_kill_in_the_set_aside_then_the_same_overwrite_completes(
    old_run, new_reference, tmp_path
):
    out = tmp_path / "run"
    _copy(old_run[1], out)
    argv = ["train", *NEW, "--out", str(out), "--overwrite"]
    assert _killed(argv, "sharpscope.runfolder", 3) == -signal.SIGKILL
    assert main(argv) == 0
    _same_weights(out / "checkpoint.pt", new_reference)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "trajectory").exists()  # the old run's, gone with it
    assert sorted(os.listdir(out)) == [
        "checkpoint.pt",
        "config.json",
        "metrics.jsonl",
        "notes.txt",
        "resume.pt",
    ]


AGAIN = ([], ["--overwrite"], ["--resume"])
FIRST_WRITES = [
    pytest.param(k, again, marks=[pytest.mark.slow] if i != k else [])
    for k in range(3)
    for i, again in enumerate(AGAIN)
]


@pytest.mark.parametrize("writes_done, again", FIRST_WRITES)
def test_a_run_killed_in_its_first_writes_restarts_with_the_same_command(
    new_reference, tmp_path, writes_done, again
):
    # Writes of a fresh run: config.json, metrics.jsonl, resume.pt. A kill before the
    # k-th rename leaves the first k files and a .tmp- file of the next.
    out = tmp_path / "run"
    argv = ["train", *NEW, "--out", str(out)]
    assert _killed(argv, "sharpscope.files", writes_done) == -signal.SIGKILL
    names = sorted(os.listdir(out))
    assert [n for n in names if n.startswith(".tmp-")], names
    assert "resume.pt" not in names
    assert main([*argv, *again]) == 0
    _same_weights(out / "checkpoint.pt", new_reference)
    assert not [n for n in os.listdir(out) if n.startswith(".") or n == LOCK_NAME]


def test_a_finished_run_without_its_resume_point_is_never_restarted(old_run, tmp_path, capsys):
    out = tmp_path / "run"
    _copy(old_run[1], out)
    (out / "resume.pt").unlink()  # deleted by its owner to save space
    for flags in ([], ["--resume"]):
        assert main(["train", *OLD, "--out", str(out), *flags]) == 2
        assert "--overwrite" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == old_run[1]["checkpoint.pt"]


def test_two_processes_on_one_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    slow = ["--data", "synthetic", "--train-subset", "512", "--model", "mlp", "--width", "64"]
    slow += ["--batch-size", "4", "--epochs", "200", "--quiet"]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    first = subprocess.Popen(
        [sys.executable, "-m", "sharpscope", "train", *slow, "--out", str(out)], env=env, cwd=REPO
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "resume.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second could start"
        for flags in ([], ["--resume"], ["--overwrite"]):
            assert main(["train", *slow, "--out", str(out), *flags]) == 2
            err = capsys.readouterr().err
            assert f"in use by another sharpscope process (process {first.pid})" in err, err
        config = (out / "config.json").read_text()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / "config.json").read_text() == config  # the second wrote nothing
    # The killed holder's lock went with it: the next process gets as far as comparing
    # its options with the saved run (and refuses the conflicting one).
    assert main(["train", "--out", str(out), "--resume", "--quiet", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--steps" in err and "in use" not in err


def test_the_lock_refuses_a_second_holder_and_is_removed_on_release(tmp_path):
    path = str(tmp_path / LOCK_NAME)
    with exclusive_lock(path, "this folder"):
        assert open(path).read() == str(os.getpid())
        with pytest.raises(SharpscopeError, match="this folder is in use"):
            with exclusive_lock(path, "this folder"):
                pass
    assert not os.path.exists(path)
    with exclusive_lock(path, "this folder"):  # free again
        pass


FULL_DISK = r"""
import importlib, resource, signal, sys
train_module = importlib.import_module("sharpscope.train")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
save, calls = train_module.save_checkpoint, []

def save_then_fill_the_disk(path, payload):
    calls.append(path)
    if len(calls) == 3:  # the third resume point finds the disk full
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
    return save(path, payload)

train_module.save_checkpoint = save_then_fill_the_disk
from sharpscope.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_during_torch_save_is_one_line_and_the_run_resumes(new_reference, tmp_path):
    out = tmp_path / "run"
    argv = ["train", *NEW, "--checkpoint-every", "2", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, *argv], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot write" in lines[0] and "resume.pt" in lines[0]
    assert read_checkpoint(out / "resume.pt")["resume"]["step"] == 2  # the last good one
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert main([*argv, "--resume"]) == 0
    _same_weights(out / "checkpoint.pt", new_reference)


def test_a_requeued_job_reruns_its_own_command_line(new_reference, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *NEW, "--checkpoint-every", "3", "--out", str(out)]
    assert _killed(argv, "sharpscope.files", 6) == -signal.SIGKILL  # after a resume point
    step = read_checkpoint(out / "resume.pt")["resume"]["step"]
    assert 0 < step < 8
    before = {k: v for k, v in _files(out).items() if not k.startswith(".tmp-")}
    err = exit2([*argv, "--resume", "--lr", "0.2"], capsys)
    assert "--lr (0.1 saved, 0.2 now)" in err
    assert _files(out) == before
    assert main([*argv, "--resume"]) == 0  # the same options: accepted
    _same_weights(out / "checkpoint.pt", new_reference)
    final = (out / "checkpoint.pt").read_bytes()
    assert main([*argv, "--resume"]) == 0  # and once more: complete, nothing to do
    assert (out / "checkpoint.pt").read_bytes() == final


def test_resume_of_a_folder_with_no_resume_point_starts_the_run_and_says_so(
    new_reference, tmp_path, capsys
):
    for out in (tmp_path / "missing", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        assert main(["train", *NEW[:-1], "--out", str(out), "--resume"]) == 0  # not --quiet
        assert "no resume point yet; starting the run from the beginning" in capsys.readouterr().out
        _same_weights(out / "checkpoint.pt", new_reference)


def test_two_processes_on_one_landscape(old_run, tmp_path, capsys):
    checkpoint = str(old_run[0] / "checkpoint.pt")
    out = tmp_path / "surface.npz"
    argv = ["landscape", checkpoint, "--out", str(out), "--dim", "2", "--points", "301"]
    argv += ["--samples", "64", "--quiet"]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "sharpscope", *argv], env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        lock = tmp_path / "surface.npz.lock"
        while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first landscape ended before the second could start"
        for flags in ([], ["--resume"]):
            assert main([*argv, *flags]) == 2
            err = capsys.readouterr().err
            assert f"in use by another sharpscope process (process {first.pid})" in err, err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not out.exists()


def test_an_overwrite_of_an_unfinished_replacement_keeps_both_older_runs(
    old_run, new_reference, tmp_path, capsys
):
    # A finished; B replacing it, killed after a resume point; C replacing B.
    out = tmp_path / "run"
    _copy(old_run[1], out)
    replacing = ["train", *NEW, "--checkpoint-every", "3", "--out", str(out)]
    assert _killed([*replacing, "--overwrite"], "sharpscope.files", 6) == -signal.SIGKILL
    b = {k: v for k, v in _files(out).items() if not k.startswith(".")}
    assert 0 < read_checkpoint(out / "resume.pt")["resume"]["step"] < 8
    # C diverges: B comes back as it was, with A still set aside for it.
    assert main(["train", *DIVERGING, "--out", str(out), "--overwrite"]) == 2
    assert "diverged" in capsys.readouterr().err
    assert {k: v for k, v in _files(out).items() if not k.startswith(".")} == b
    a = {k[len(".replaced-run/") :]: v for k, v in _files(out).items() if k.startswith(".")}
    assert a == {k: v for k, v in old_run[1].items() if k != "notes.txt"}  # A's run files
    # B completes with its own command line; only then does A go.
    assert main([*replacing, "--resume"]) == 0
    _same_weights(out / "checkpoint.pt", new_reference)
    assert not (out / ".replaced-run").exists() and (out / "notes.txt").read_text() == "mine"


def test_a_folder_of_someone_elses_files_is_never_touched(tmp_path, capsys):
    folder = tmp_path / "model"  # e.g. a Hugging Face model folder
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 768}')
    (folder / "pytorch_model.bin").write_bytes(b"weights")
    (folder / ".tmp-editor-swap").write_text("unsaved")
    before = _files(folder)
    for flags in ([], ["--overwrite"], ["--resume"]):
        assert "not a sharpscope run folder" in exit2(
            ["train", *NEW, "--out", str(folder), *flags], capsys
        )
        assert _files(folder) == before


def test_signals_during_a_move_are_delivered_after_it():
    from sharpscope.runfolder import signals_held

    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert received == []  # held while the files move
        assert received == [signal.SIGTERM]  # and delivered once they have
    finally:
        signal.signal(signal.SIGTERM, previous)
