"""Loss functions by name, and accuracy.

Every loss maps ``(outputs, targets) -> mean loss over the examples`` so that a
batch of size b weighted by b / n gives the full-data mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .errors import SharpscopeError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def logits_of(outputs: Any) -> torch.Tensor:
    """The prediction tensor of a model's output: the output itself, its ``.logits``
    (Hugging Face output objects) or its first element (a tuple)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, list | tuple) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise SharpscopeError(
        f"the model returned {type(outputs).__name__}, not a tensor of predictions: pass "
        "loss_fn=(outputs, targets) -> loss, or batch_loss=(model, batch) -> loss"
    )


def cross_entropy(
    outputs: Any, targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy of logits ``outputs`` (n, C) against class indices (n,), or
    against class probabilities of the same shape as the logits (``label_smoothing``:
    torch's).

    Float targets of any other shape are refused: they are regression targets, and
    cross-entropy over them is silently meaningless (over one output column it is 0).
    """
    logits = logits_of(outputs)
    if targets.is_floating_point() and not (
        targets.shape == logits.shape and logits.dim() >= 2 and logits.shape[-1] > 1
    ):
        raise SharpscopeError(
            f"cross-entropy needs class indices as targets, got {targets.dtype} targets of "
            f"shape {tuple(targets.shape)} for outputs of shape {tuple(logits.shape)}: for "
            "regression use the 'mse' loss (or your own loss_fn)"
        )
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def mse(outputs: Any, targets: torch.Tensor) -> torch.Tensor:
    """0.5 * ||f(x) - t||^2 averaged over examples, with t = onehot(y) for class
    indices y and t = y for float (regression) targets.

    The convention of the edge-of-stability literature (Cohen et al. 2021, App. A):
    summed over the outputs, averaged over examples. Regression targets of shape (n,)
    go with outputs of shape (n,) or (n, 1).
    """
    pred = logits_of(outputs)
    if targets.is_floating_point():
        if pred.shape != targets.shape and pred.shape == (*targets.shape, 1):
            pred = pred.squeeze(-1)
        if pred.shape != targets.shape:
            raise SharpscopeError(
                f"mse: outputs of shape {tuple(pred.shape)} for targets of shape "
                f"{tuple(targets.shape)}"
            )
        diff = (pred - targets.to(pred.dtype)).reshape(len(pred), -1)
        return 0.5 * diff.pow(2).sum(dim=-1).mean()
    onehot = F.one_hot(targets, pred.shape[-1]).to(pred.dtype)
    return 0.5 * (pred - onehot).pow(2).sum(dim=-1).mean()


class LabelSmoothingCrossEntropy:
    """Cross-entropy with label smoothing (a picklable callable, unlike a lambda)."""

    def __init__(self, smoothing: float):
        self.smoothing = float(smoothing)

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(outputs, targets, self.smoothing)


LOSSES = ("ce", "mse")


def get_loss(name: str = "ce", label_smoothing: float = 0.0) -> LossFn:
    """The loss called ``name`` ("ce" or "mse")."""
    if name == "ce":
        return LabelSmoothingCrossEntropy(label_smoothing) if label_smoothing else cross_entropy
    if name == "mse":
        if label_smoothing:
            raise SharpscopeError("label smoothing applies to the 'ce' loss only")
        return mse
    raise SharpscopeError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")


def correct_count(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Number of examples whose arg-max output is the target (a 0-d tensor)."""
    return (outputs.argmax(dim=-1) == targets).sum()


def class_hits(outputs: Any, targets: Any) -> torch.Tensor | None:
    """:func:`correct_count` where accuracy is defined, None elsewhere: one integer class
    index per example (targets of shape (n,)), predictions of shape (n, C). Targets per
    token (a language model's) have no per-example accuracy: None."""
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point():
        return None
    if targets.dim() != 1:
        return None
    if targets.dtype in (torch.bool, torch.uint8) or targets.is_complex():
        return None
    try:
        logits = logits_of(outputs)
    except SharpscopeError:
        return None
    if logits.dim() != targets.dim() + 1 or logits.shape[:-1] != targets.shape:
        return None
    if logits.shape[-1] < 2:
        return None
    return correct_count(logits, targets)
