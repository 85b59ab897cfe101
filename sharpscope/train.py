"""The training run: :func:`train` opens the run folder, builds the trainer and runs the
loop, which reads top to bottom (in the spirit of nanoGPT) in :meth:`_Run.loop`.

The pieces: :mod:`sharpscope.train_config` (the options), :mod:`sharpscope.trainer` (one
optimization step, alone or data-parallel), :mod:`sharpscope.runfolder` (the folder, its
lock, set-aside and recovery, the signals that stop a run). A run folder ``OUT`` holds::

    config.json            the resolved TrainConfig
    metrics.jsonl          one JSON object per line: {"kind": "epoch" | "track" | "final", ...}
    checkpoint.pt          the final model (checkpoint.save_checkpoint format)
    resume.pt              the same plus "resume": a TrainState and the optimizer's state
    trajectory/step_NNNNNNN.pt   intermediate models with --save-every (no resume state)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import asdict, fields
from typing import Any

import torch

from . import distributed
from .checkpoint import check_trusted_model, read_checkpoint, save_checkpoint
from .data import DATASETS, check_trusted_data, data_difference, data_spec, load_dataset
from .devices import resolve_device
from .errors import SharpscopeError, first_line
from .files import write_json, write_jsonl
from .models import check_weights_fit
from .runfolder import TRAJECTORY, RunFolder, StopRequest, stop_on_signals
from .sam import GSAM
from .train_config import (
    LOCATION_FIELDS,
    TrainConfig,
    config_from_dict,
    resolve_amp,
    resolve_config,
)
from .train_state import TrainState, _EpochTotals
from .trainer import Trainer, _cpu_state_dict, _to_cpu
from .usercode import same_factory

# A resume point at every epoch end, but at most this often in wall time, so that
# full-batch runs (one step per epoch) do not spend their time writing; step-based
# resume points (--checkpoint-every) are not throttled.
RESUME_MIN_INTERVAL_S = 10.0
METRICS_MIN_INTERVAL_S = 2.0


class Diverged(SharpscopeError):
    """The training loss became NaN or infinite: the run is worth nothing."""


class NoResumePoint(SharpscopeError):
    """The run folder holds no resume point (resume.pt) to continue from."""


def train(
    config: TrainConfig,
    out: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train as ``config`` says and write the run folder ``out``; return final metrics.

    ``resume=True`` continues the run in ``out`` from its resume point (its saved
    configuration must equal ``config`` but for :data:`LOCATION_FIELDS`); a folder
    with no resume point yet starts the run from the beginning. ``overwrite=True``
    replaces an old run there (only its run files; they are set aside when the new run
    starts, deleted when it completes, and put back if it diverges; see
    :mod:`sharpscope.runfolder`). One process at a time works in ``out`` (a lock).
    Bad options and damaged files raise :class:`SharpscopeError` before anything is
    written; a fresh run that diverges (:class:`Diverged`) leaves no files behind and
    puts a replaced run back; any other failure keeps the run, to be resumed.

    In one process, the first SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption) stops
    the run at the end of the current step with a resume point saved, then raises
    KeyboardInterrupt; ``resume=True`` continues it bit for bit (CPU).

    Launched by ``torchrun`` (WORLD_SIZE > 1), or called on every process of an
    initialized process group, this trains data-parallel (:mod:`sharpscope.trainer`):
    every process must call it with the same arguments; rank 0 alone writes ``out``
    and prints; every process returns rank 0's final metrics, after they are written.
    """
    out = os.fspath(out)
    # Checks that need nothing but the options raise alike on every process, before
    # the process group is joined.
    c = resolve_config(config)
    device = distributed.init_from_environment(resolve_device(c.device))
    c = dataclasses.replace(c, device=str(device), amp=resolve_amp(c.amp, device))
    main = distributed.is_main_process()
    folder = RunFolder(out, say=_silent if quiet else _print)
    with contextlib.ExitStack() as held:
        # Rank 0 locks the folder, reads the resume point and hands it out: the other
        # processes must not race it. (With --resume, OUT must be on a file system that
        # every node sees.)
        def open_folder() -> dict[str, Any] | None:
            held.enter_context(folder.locked())
            mode = folder.start_mode(resume, overwrite)
            return _read_resume_point(out, c) if mode == "resume" else None

        saved = distributed.on_main(open_folder)
        spec = data_spec(
            c.data,
            train_subset=c.train_subset,
            data_dir=c.data_dir,
            download=c.download,
            label_noise=c.label_noise,
        )
        # A download happens once, on rank 0; the others then read what it fetched.
        load = distributed.main_first if c.download else (lambda fn: fn())
        dataset = load(lambda: load_dataset(spec))
        if saved is not None:
            difference = data_difference(saved.get("data"), dataset.spec)
            if difference is not None:  # the run would go on on other data
                raise SharpscopeError(f"--resume: {difference}")
        resolve_config(c, dataset)
        devices = [device.index or 0] if device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=devices),  # the caller's global RNG is restored
            stop_on_signals(distributed.world_size() == 1) as stop,
        ):
            run = _Run(Trainer(c, dataset, device), folder, progress=progress, quiet=quiet)
            try:
                metrics = run.loop(saved, overwrite, stop)
            except Diverged:
                # Worth nothing: a fresh run's files go, and a replaced run comes back.
                if saved is None and main and folder.put_back() and overwrite:
                    print(f"sharpscope train: {out} holds its previous run again", file=sys.stderr)
                raise
            except BaseException:
                # Interrupted, out of memory, disk full...: the run stays, to be resumed;
                # a run it replaces stays set aside until it completes.
                aside = folder.set_aside_path() if main else None
                if aside is not None:
                    print(
                        f"sharpscope train: the run this one replaces is kept in {aside} "
                        "until this one completes",
                        file=sys.stderr,
                    )
                raise
        if main:
            folder.finish()
    # Rank 0's numbers everywhere; and no process returns before the folder is written.
    return distributed.broadcast_object(metrics)


def load_run_config(
    out: str,
    *,
    model: str | None = None,
    data: str | None = None,
    trust_code: bool = False,
    quiet: bool = False,
) -> TrainConfig:
    """The configuration of the run in folder ``out``, from its resume point.

    First finishes what a killed process left half done in the folder (under its
    lock; see :mod:`sharpscope.runfolder`). The data folder and download flag the
    resume point records are dropped (give your own); a model factory it names is
    refused unless ``model`` names the same one or ``trust_code``, and so is the user's
    own data (a file, folder or factory) it names, unless ``data`` names data (which
    replaces it) or ``trust_code``. Raises :class:`NoResumePoint` if there is none.
    """
    if not os.path.isdir(out):
        raise NoResumePoint(f"{out}: no resume checkpoint (resume.pt) to continue from")
    with RunFolder(out, say=_silent if quiet else _print).locked() as folder:
        if not folder.resumable():
            raise NoResumePoint(f"{out}: no resume checkpoint (resume.pt) to continue from")
        path = os.path.join(out, "resume.pt")
        saved = read_checkpoint(path)
    config = dataclasses.replace(
        config_from_dict(saved.get("config"), path), data_dir=None, download=False
    )
    if config.model is not None:
        check_trusted_model(config.model, path, named=model, trust_code=trust_code)
    if data is not None:
        config = dataclasses.replace(config, data=data)
    else:
        check_trusted_data(config.data, path, trust_code=trust_code)
    resolve_config(config)  # known choices, ranges: refused on read
    return config


def _read_resume_point(out: str, c: TrainConfig) -> dict[str, Any]:
    """The resume point of the run in ``out``, checked field by field, after checking
    that ``c`` (resolved, on its device) is its configuration but for LOCATION_FIELDS."""
    path = os.path.join(out, "resume.pt")
    saved = read_checkpoint(path)
    if not isinstance(saved.get("resume"), dict) or "config" not in saved:
        raise SharpscopeError(f"{path} is not a sharpscope resume checkpoint")
    saved["resume"] = TrainState.from_dict(saved["resume"], path)
    saved_config = resolve_config(config_from_dict(saved["config"], path))
    saved_config = dataclasses.replace(
        saved_config, amp=resolve_amp(saved_config.amp, torch.device(c.device))
    )
    differ = [
        f"--{f.name.replace('_', '-')} ({getattr(saved_config, f.name)!r} saved, "
        f"{getattr(c, f.name)!r} now)"
        for f in fields(TrainConfig)
        if f.name not in LOCATION_FIELDS
        and not _same_option(f.name, getattr(c, f.name), getattr(saved_config, f.name))
    ]
    if differ:
        raise SharpscopeError(
            f"--resume continues the saved run; these options differ from it: {', '.join(differ)}"
        )
    return saved


def _same_option(name: str, now: Any, saved: Any) -> bool:
    """Whether a resumed run's option is the saved one. A model factory is the same by
    :func:`~sharpscope.usercode.same_factory`; the user's own data by what identifies it
    (checked once it is loaded, in :func:`train`), whatever path it is named by now."""
    if name == "model":
        return same_factory(now, saved)
    if name == "data" and now not in DATASETS and saved not in DATASETS:
        return True
    return now == saved


# -- the loop -------------------------------------------------------------------------------
class _Run:
    """One session of a run: the trainer, its folder and its :class:`TrainState`.

    Under DDP every process runs the loop in step (the collectives: gradients,
    evaluation, tracking); only rank 0 prints and writes.
    """

    def __init__(self, t: Trainer, folder: RunFolder, *, progress: bool, quiet: bool):
        self.t, self.c, self.plan, self.folder = t, t.c, t.plan, folder
        self.out = folder.path
        self.main = distributed.is_main_process()
        self.say = _silent if quiet or not self.main else _print
        self.show_bar = progress and not quiet and self.main and sys.stderr.isatty()
        self.state = TrainState(world_size=t.world)
        self.totals = _EpochTotals(t.device)
        self.tracked = None
        if self.c.track_every is not None:
            self.tracked = t.dataset.examples("train", self.c.track_samples, seed=self.c.seed)
        self.header = {"model": t.spec, "data": t.dataset.spec, "config": asdict(self.c)}
        self.session_start = self.last_resume = self.last_metrics = time.monotonic()

    def loop(
        self, saved: dict[str, Any] | None, overwrite: bool, stop: StopRequest | None
    ) -> dict[str, Any]:
        """The training loop, from step 0 or from the resume point ``saved``; returns the
        final metrics."""
        c, plan, t = self.c, self.plan, self.t
        if saved is not None:
            if saved["resume"].complete:
                step = saved["resume"].step
                self.say(f"{self.out}: the run is complete (step {step}); nothing to do")
                return dict(saved.get("metrics", {}))
            self.restore(saved)
        else:
            self.begin(overwrite)
        s = self.state
        epoch_start, bar = time.monotonic(), None
        while s.step < plan.total_steps:
            left = plan.total_steps - s.epoch * plan.steps_per_epoch
            in_epoch = min(plan.steps_per_epoch, left)  # the last epoch may be partial
            if bar is None and self.show_bar:
                bar = self.progress_bar(in_epoch)
            x, y = t.batch(s.epoch, s.index, s.step)
            lr = t.set_lr(s.step)
            loss_sum, correct, skipped = t.step(x, y, s.step)
            # Totals of the global batch (summed over the processes in t.step); no host
            # sync: they stay on the device.
            self.totals.add(loss_sum, correct, plan.batch_size, skipped)
            s.step, s.index = s.step + 1, s.index + 1
            if bar is not None:
                bar.update(1)
            if self.tracked is not None and s.step % c.track_every == 0:
                self.track()
            if c.save_every is not None and (
                s.step % c.save_every == 0 or s.step == plan.total_steps
            ):
                self.save_trajectory()
            epoch_done = s.index >= in_epoch
            if epoch_done:
                if bar is not None:
                    bar = bar.close()
                self.end_epoch(lr, time.monotonic() - epoch_start)
                epoch_start = time.monotonic()
            if s.step < plan.total_steps:
                self.save_progress(epoch_done)
                if stop is not None and stop.signal is not None:
                    if bar is not None:
                        bar.close()
                    self.stop(stop.signal)
        if bar is not None:
            bar.close()
        return self.finish()

    # -- the steps of the loop, in the order they happen --------------------------------
    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from a resume point: weights, optimizer, scaler and the TrainState."""
        t, s = self.t, saved["resume"]
        path = os.path.join(self.out, "resume.pt")
        s.check_fits(self.plan, path)
        check_weights_fit(t.model.state_dict(), saved["state_dict"], path)
        try:
            t.model.load_state_dict(saved["state_dict"])
            t.optimizer.load_state_dict(s.optimizer)
            if t.scaler is not None and s.scaler:
                t.scaler.load_state_dict(s.scaler)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise SharpscopeError(f"{path}: a damaged resume point ({first_line(exc)})") from None
        _check_optimizer_state(t.optimizer, path)
        self.state = dataclasses.replace(s, world_size=t.world)
        self.totals = _EpochTotals(t.device, s.totals)
        self.say(f"resuming {self.out} at step {s.step} (epoch {s.epoch + 1}, batch {s.index})")
        if t.device.type == "cpu" and s.threads not in (None, torch.get_num_threads()):
            # CPU reductions split work by thread: the last bits can differ.
            self.say(
                f"note: the run used {s.threads} CPU threads, this process "
                f"{torch.get_num_threads()}; the result matches an uninterrupted run only "
                "up to rounding"
            )
        if s.world_size != t.world:
            self.say(
                f"note: the run used {s.world_size} processes, this one {t.world}; the "
                "result matches an uninterrupted run only up to rounding (and BatchNorm "
                "batch statistics and dropout masks differ)"
            )

    def begin(self, overwrite: bool) -> None:
        """Start at step 0: the folder made ready (an old run set aside with --overwrite,
        a killed start's leftovers gone) only now, with the run set up; then config.json,
        the first trajectory point and tracking record, and a resume point."""
        if self.main:
            self.folder.begin_fresh(overwrite)
            write_json(os.path.join(self.out, "config.json"), asdict(self.c))
        if self.c.save_every is not None:
            self.save_trajectory()
        if self.tracked is not None:
            self.track()
        self.write_resume()

    def progress_bar(self, in_epoch: int) -> Any:
        from tqdm import tqdm

        s = self.state
        return tqdm(
            total=in_epoch,
            initial=s.index,
            desc=f"epoch {s.epoch + 1}/{self.plan.epochs}",
            leave=False,
            file=sys.stderr,
        )

    def track(self) -> None:
        record = self.t.track(self.state.step, self.tracked)
        self.state.records.append(record)
        line = f"step {self.state.step}: hessian top eigenvalue {record['hessian_top']:.4g}"
        if "sharpness" in record:
            line += f", sharpness {record['sharpness']:.4g}"
        self.say(line)

    def save_trajectory(self) -> None:
        if not self.main:
            return
        s = self.state
        os.makedirs(os.path.join(self.out, TRAJECTORY), exist_ok=True)
        payload = {**self.header, "metrics": {"step": s.step, "epoch": s.epoch}}
        path = os.path.join(self.out, TRAJECTORY, f"step_{s.step:07d}.pt")
        save_checkpoint(path, {**payload, "state_dict": _cpu_state_dict(self.t.model)})

    def end_epoch(self, lr: float, seconds: float) -> None:
        """Record the epoch, refuse a diverged loss, and start the next epoch's totals."""
        s = self.state
        record = _epoch_record(self.t, s.epoch, s.step, lr, self.totals, seconds)
        s.records.append(record)
        self.say(_summary(record, self.plan.epochs))
        if self.c.amp != "fp16" and not math.isfinite(record["train_loss"]):
            self.write_metrics()
            raise Diverged(
                f"training diverged: the loss is {record['train_loss']} in epoch "
                f"{s.epoch + 1}; try a smaller --lr"
            )
        s.epoch, s.index = s.epoch + 1, 0
        self.totals = _EpochTotals(self.t.device)

    def save_progress(self, epoch_done: bool) -> None:
        """A resume point every --checkpoint-every steps, or at an epoch's end at most
        every RESUME_MIN_INTERVAL_S; metrics.jsonl at an epoch's end at most every
        METRICS_MIN_INTERVAL_S."""
        now = time.monotonic()
        if self.c.checkpoint_every is not None:
            if self.state.step % self.c.checkpoint_every == 0:
                self.write_resume()
        elif epoch_done and now - self.last_resume >= RESUME_MIN_INTERVAL_S:
            self.write_resume()
        if epoch_done and now - self.last_metrics >= METRICS_MIN_INTERVAL_S:
            self.write_metrics()

    def stop(self, signum: int) -> None:
        """A SIGINT or SIGTERM came: save a resume point and stop."""
        self.write_resume()
        name = signal.Signals(signum).name
        print(
            f"sharpscope train: {name}: stopped after step {self.state.step}; "
            f"continue with --resume --out {self.out}",
            file=sys.stderr,
        )
        raise KeyboardInterrupt

    def finish(self) -> dict[str, Any]:
        """The final evaluation, checkpoint.pt and a complete resume point."""
        t, s = self.t, self.state
        final: dict[str, Any] = {
            "kind": "final",
            "step": s.step,
            "epochs": s.step / self.plan.steps_per_epoch,
        }
        epochs_logged = [r for r in s.records if r["kind"] == "epoch"]
        if self.totals.seen:  # a partial last epoch (step mode)
            totals = self.totals.to_dict()
            final["train_loss"] = totals["loss"] / self.totals.seen
            final["train_accuracy"] = totals["correct"] / self.totals.seen
        elif epochs_logged:
            final["train_loss"] = epochs_logged[-1]["train_loss"]
            final["train_accuracy"] = epochs_logged[-1]["train_accuracy"]
        if not t.classes:  # regression: no accuracy
            final["train_accuracy"] = None
        train_eval, test_eval = t.evaluate("train"), t.evaluate("test")
        final["train_eval_loss"] = train_eval["loss"]  # whole training set, eval mode
        final["train_eval_accuracy"] = train_eval["accuracy"]
        final["test_loss"] = test_eval["loss"]
        final["test_accuracy"] = test_eval["accuracy"]
        final["seconds"] = s.elapsed + time.monotonic() - self.session_start
        final["world_size"] = t.world
        s.records.append(final)
        metrics = {k: v for k, v in final.items() if k != "kind"}
        if self.main:
            payload = {**self.header, "metrics": metrics, "state_dict": _cpu_state_dict(t.model)}
            save_checkpoint(os.path.join(self.out, "checkpoint.pt"), payload)
        self.write_resume(metrics)
        accuracy = final["test_accuracy"]
        accuracy = "" if accuracy is None else f"test accuracy {100 * accuracy:.2f}%, "
        self.say(
            f"done: {s.step} steps in {final['seconds']:.1f}s, {accuracy}"
            f"test loss {final['test_loss']:.4f}; wrote {self.out}"
        )
        return metrics

    # -- writing ------------------------------------------------------------------------
    def write_metrics(self) -> None:
        if not self.main:
            return
        write_jsonl(os.path.join(self.out, "metrics.jsonl"), self.state.records)
        self.last_metrics = time.monotonic()

    def write_resume(self, metrics: dict[str, Any] | None = None) -> None:
        """resume.pt: the weights, the optimizer's and scaler's states and the TrainState
        (complete when ``metrics`` are given). metrics.jsonl first: the resume point
        carries the records, so a kill between the two writes loses nothing."""
        if not self.main:  # what it saves is the same on every process (rank 0's buffers)
            return
        t = self.t
        state = dataclasses.replace(
            self.state,
            elapsed=self.state.elapsed + time.monotonic() - self.session_start,
            totals=self.totals.to_dict(),
            records=list(self.state.records),
            complete=metrics is not None,
            optimizer=_to_cpu(t.optimizer.state_dict()),
            scaler=t.scaler.state_dict() if t.scaler is not None else None,
            threads=torch.get_num_threads(),
        )
        self.write_metrics()
        payload = {**self.header, "metrics": metrics or {}, "state_dict": _cpu_state_dict(t.model)}
        resume = {**payload, "resume": state.to_dict()}
        save_checkpoint(os.path.join(self.out, "resume.pt"), resume)
        self.last_resume = time.monotonic()


def _check_optimizer_state(optimizer: torch.optim.Optimizer, path: str) -> None:
    """Refuse optimizer state for parameters the run lacks, or of the wrong shape."""
    for p, entries in optimizer.state.items():
        if not isinstance(p, torch.Tensor):  # state of a parameter the run does not have
            raise SharpscopeError(f"{path}: a damaged resume point (optimizer state of {p!r})")
        for value in entries.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise SharpscopeError(
                    f"{path}: a damaged resume point (optimizer state of shape "
                    f"{list(value.shape)} for a parameter of shape {list(p.shape)})"
                )


def _epoch_record(
    t: Trainer, epoch: int, step: int, lr: float, acc: _EpochTotals, seconds: float
) -> dict[str, Any]:
    totals = acc.to_dict()
    record: dict[str, Any] = {
        "kind": "epoch",
        "epoch": epoch + 1,
        "step": step,
        "train_loss": totals["loss"] / max(totals["seen"], 1),
        "train_accuracy": totals["correct"] / max(totals["seen"], 1) if t.classes else None,
        "lr": lr,
    }
    if (epoch + 1) % t.c.eval_every == 0:
        test = t.evaluate("test")
        record["test_loss"], record["test_accuracy"] = test["loss"], test["accuracy"]
    if isinstance(t.optimizer, GSAM):
        record["rho"] = t.optimizer.param_groups[0]["rho"]
    if t.scaler is not None:
        record["skipped_steps"] = totals["skipped"]
        record["loss_scale"] = t.scaler.get_scale()
    record["seconds"] = seconds
    return record


def _summary(r: dict[str, Any], epochs: int) -> str:
    def acc(value: float | None) -> str:
        return "" if value is None else f" acc {100 * value:.2f}%"

    line = (
        f"epoch {r['epoch']}/{epochs}  step {r['step']}  "
        f"train loss {r['train_loss']:.4f}{acc(r['train_accuracy'])}"
    )
    if "test_loss" in r:
        line += f"  test loss {r['test_loss']:.4f}{acc(r['test_accuracy'])}"
    return line + f"  lr {r['lr']:.4g}  {r['seconds']:.1f}s"


def _silent(msg: str) -> None:
    pass


def _print(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stdout)  # above a progress bar, if one is shown
    sys.stdout.flush()


__all__ = ["Diverged", "NoResumePoint", "TrainConfig", "TrainState", "load_run_config", "train"]
