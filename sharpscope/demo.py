"""The SGD-versus-SAM demo: two runs alike but for the optimizer, then compared."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from .compare import _make_folder, compare_checkpoints
from .errors import SharpscopeError
from .settings import CompareSettings


def demo(
    out: str,
    *,
    seed: int = 0,
    epochs: int | None = None,
    rho: float | None = None,
    overwrite: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    **compare_options: Any,
) -> dict[str, Any]:
    """Train SGD and SAM on the default data (digits) with the same seed and budget
    (``out``/sgd, ``out``/sam), then :func:`compare_checkpoints` them into
    ``out``/compare. ``epochs`` and ``rho`` None keep :class:`TrainConfig`'s defaults;
    ``compare_options`` are fields of :class:`~sharpscope.settings.CompareSettings`
    (``seed`` is the demo's unless given). Returns the comparison's document, with each
    run's command, configuration, final metrics and time under "training"."""
    from .train import TrainConfig, train

    say = log or (lambda message: None)
    given = {"seed": seed, "epochs": epochs, "device": str(device)}
    if rho is not None:
        given["rho"] = rho
    TrainConfig(optimizer="sam", **given)  # checked before any training: fail fast
    settings = CompareSettings(**{"seed": seed, **compare_options})
    for optimizer in ("sgd", "sam"):
        folder = os.path.join(out, optimizer)
        if not overwrite and os.path.isdir(folder) and os.listdir(folder):
            raise SharpscopeError(
                f"{folder} is not empty (an earlier demo?): pass --overwrite to replace the "
                "runs, or a new --out"
            )
    _make_folder(out)
    training: dict[str, Any] = {}
    for optimizer in ("sgd", "sam"):
        config = TrainConfig(optimizer=optimizer, **given)
        folder = os.path.join(out, optimizer)
        command = f"sharpscope train --optimizer {optimizer} --seed {seed} --out {folder}"
        command += f" --epochs {epochs}" if epochs is not None else ""
        command += f" --rho {rho:g}" if rho is not None and optimizer == "sam" else ""
        say(command)
        start = time.perf_counter()
        metrics = train(config, folder, overwrite=overwrite, progress=progress, quiet=True)
        training[optimizer] = {
            "command": command,
            "config": asdict(config),
            "metrics": metrics,
            "seconds": time.perf_counter() - start,
        }
    return compare_checkpoints(
        os.path.join(out, "sgd", "checkpoint.pt"),
        os.path.join(out, "sam", "checkpoint.pt"),
        os.path.join(out, "compare"),
        settings,
        labels=("SGD", "SAM"),
        device=device,
        progress=progress,
        log=log,
        training=training,
        overwrite=overwrite,
    )
