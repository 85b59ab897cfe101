"""PyTorch's own distributed engine, as launched by ``torchrun``.

``torchrun --nproc_per_node N -m sharpscope COMMAND ...`` sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous variables; :func:`init_from_environment` joins the
process group (NCCL on CUDA, gloo on the CPU) and picks this process's device.
Analyses then need nothing else: an :class:`~sharpscope.objective.Objective`
built inside a process group shards its examples and all-reduces its sums, so
every rank sees full-data L, gradients and HVPs. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    """True when the environment carries a torchrun world of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_environment(device: torch.device) -> torch.device:
    """Join the torchrun process group (once) and return this rank's device.

    On CUDA each process takes ``cuda:LOCAL_RANK``; on the CPU the device is unchanged.
    Without torchrun this does nothing and returns ``device``.
    """
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes files and prints."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (itself when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
