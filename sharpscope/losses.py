"""Loss functions by name, and accuracy.

Every loss maps ``(outputs, targets) -> mean loss over the examples`` so that a
batch of size b weighted by b / n gives the full-data mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import SharpscopeError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``outputs`` (n, C) against class indices (n,)."""
    return F.cross_entropy(outputs, targets)


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0.5 * ||f(x) - onehot(y)||^2 averaged over examples.

    The convention of the edge-of-stability literature (Cohen et al. 2021, App. A):
    summed over classes, averaged over examples.
    """
    onehot = F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
    return 0.5 * (outputs - onehot).pow(2).sum(dim=-1).mean()


class LabelSmoothingCrossEntropy:
    """Cross-entropy with label smoothing (a picklable callable, unlike a lambda)."""

    def __init__(self, smoothing: float):
        self.smoothing = float(smoothing)

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, label_smoothing=self.smoothing)


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
