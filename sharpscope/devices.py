"""Devices: which one a name means, and how much memory it has."""

from __future__ import annotations

import os

import torch

from .errors import SharpscopeError

# The device types sharpscope computes on (``meta`` holds no numbers, ``mps`` lacks the
# float64 its tests rely on).
DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; refuse CUDA where there is none, and
    any device that is not a CPU or a CUDA GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SharpscopeError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in DEVICE_TYPES:
        raise SharpscopeError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SharpscopeError(f"--device {name} asked for, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SharpscopeError(
                f"--device {name}: there are {torch.cuda.device_count()} CUDA devices"
            )
    return device


def memory_bytes(device: torch.device) -> int | None:
    """The memory of ``device`` in bytes (a GPU's total, or the machine's RAM); None
    where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device.index or 0).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None
