"""The state of a training run that a resume point saves: :class:`TrainState`, checked
entry by entry when it is read back, and the running sums of the epoch under way."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .checks import is_real, is_whole
from .errors import SharpscopeError
from .train_config import Plan


@dataclass
class TrainState:
    """Where a run stands, saved in every resume point and loaded back as one object:
    the position (``step``; ``epoch`` and ``index``, the batch within it), the training
    seconds of earlier sessions, the running sums of the epoch so far (``totals``: loss
    times batch size, correct, seen, skipped steps), the metric ``records`` so far, and
    whether the run is ``complete``. ``optimizer`` and ``scaler`` hold their states."""

    step: int = 0
    epoch: int = 0
    index: int = 0
    elapsed: float = 0.0
    totals: dict[str, Any] = field(
        default_factory=lambda: {"loss": 0.0, "correct": 0, "seen": 0, "skipped": 0}
    )
    records: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = False
    optimizer: dict[str, Any] = field(default_factory=dict)
    scaler: dict[str, Any] | None = None
    threads: int | None = None
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The plain dict a resume point holds (no copies: the optimizer state is large)."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["accumulators"] = state.pop("totals")  # the name resume points use
        return state

    @classmethod
    def from_dict(cls, state: dict[str, Any], path: str) -> TrainState:
        """The state of a resume point, refused in one line if any entry is damaged."""
        state = dict(state)
        state["totals"] = state.pop("accumulators", None)
        for key, ok in _STATE_CHECKS.items():
            if key not in state or not ok(state[key]):
                raise SharpscopeError(
                    f"{path}: a damaged resume point (its {key} is missing or wrong)"
                )
        known = {f.name for f in fields(cls)}
        threads, world = state.get("threads"), state.get("world_size", 1)
        state["threads"] = threads if is_whole(threads, 1) else None
        state["world_size"] = world if is_whole(world, 1) else 1
        return cls(**{k: v for k, v in state.items() if k in known})

    def check_fits(self, plan: Plan, path: str) -> None:
        """Refuse a position that this run's plan cannot have reached."""
        if (
            self.step > plan.total_steps
            or self.index >= plan.steps_per_epoch
            or self.step != self.epoch * plan.steps_per_epoch + self.index
        ):
            raise SharpscopeError(
                f"{path}: a damaged resume point (step {self.step}, epoch {self.epoch}, "
                f"batch {self.index} do not fit the run)"
            )


def _json_records(records: Any) -> bool:
    """A list of metric records: JSON objects with a kind, as metrics.jsonl holds."""
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and isinstance(r.get("kind"), str) for r in records
    ):
        return False
    try:
        json.dumps(records, allow_nan=True)
    except (TypeError, ValueError):
        return False
    return True


_STATE_CHECKS = {
    "optimizer": lambda v: isinstance(v, dict) and "state" in v and "param_groups" in v,
    "scaler": lambda v: v is None or isinstance(v, dict),
    "step": lambda v: is_whole(v, 0, 2**62),
    "epoch": lambda v: is_whole(v, 0, 2**62),
    "index": lambda v: is_whole(v, 0, 2**62),
    "elapsed": lambda v: is_real(v, finite=True),
    "totals": lambda v: (
        isinstance(v, dict)
        and is_real(v.get("loss"), finite=True)
        and all(is_whole(v.get(k), 0, 2**62) for k in ("correct", "seen", "skipped"))
    ),
    "records": _json_records,
    "complete": lambda v: isinstance(v, bool),
}


class _EpochTotals:
    """Sums over the steps of an epoch so far, kept on the device (one host sync per
    epoch, not per step): clean-pass loss times batch size, correct count, skipped steps."""

    def __init__(self, device: torch.device, saved: dict[str, Any] | None = None):
        saved = saved or {"loss": 0.0, "correct": 0, "seen": 0, "skipped": 0}
        self.loss = torch.tensor(saved["loss"], dtype=torch.float64, device=device)
        self.correct = torch.tensor(saved["correct"], dtype=torch.int64, device=device)
        self.skipped = torch.tensor(saved["skipped"], dtype=torch.int64, device=device)
        self.seen = int(saved["seen"])

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor, n: int, skipped) -> None:
        self.loss += loss_sum.double()
        self.correct += correct
        self.skipped += skipped
        self.seen += n

    def to_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss.item(),
            "correct": int(self.correct.item()),
            "seen": self.seen,
            "skipped": int(self.skipped.item()),
        }
