"""PyTorch's own distributed engine, as launched by ``torchrun``.

``torchrun --nproc_per_node N -m sharpscope COMMAND ...`` sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous variables; :func:`init_from_environment` joins the
process group (NCCL on CUDA, gloo on the CPU) and picks this process's device.
Analyses then need nothing else: an :class:`~sharpscope.objective.Objective`
built inside a process group shards its examples and all-reduces its sums, so
every rank sees full-data L, gradients and HVPs; a landscape grid instead deals its
points out to the ranks (sharpscope/landscape.py). Only rank 0 writes files and prints.
``sharpscope train`` wraps its model in DistributedDataParallel (sharpscope/train.py);
the helpers below are what it needs besides: rank 0 deciding for all
(:func:`on_main`), BatchNorm buffers from rank 0, and one all-reduce of many tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import SharpscopeError

T = TypeVar("T")


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


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 only, its result handed to every rank.

    A :class:`SharpscopeError` raised by ``fn`` on rank 0 is raised on every rank (with
    the same message), so that a bad input stops the whole group at once instead of
    leaving the other ranks waiting. For work that touches the file system (checking an
    output folder, reading a checkpoint) that rank 0 may be writing at the same time.
    """
    if not is_distributed():
        return fn()
    if is_main_process():
        try:
            box: tuple[str, Any] = ("ok", fn())
        except SharpscopeError as exc:
            box = ("error", str(exc))
        except BaseException:
            broadcast_object(("crash", None))  # release the others before failing
            raise
        broadcast_object(box)
    else:
        box = broadcast_object(None)
    status, value = box
    if status == "error":
        raise SharpscopeError(value)
    if status == "crash":
        raise SharpscopeError("rank 0 failed; see its error")
    return value


def main_first(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 first, then (if it succeeded) on the other ranks, e.g. a
    download that every rank then reads from the cache. Errors as :func:`on_main`."""
    if not is_distributed():
        return fn()
    results: list[T] = []
    on_main(lambda: results.append(fn()))  # only "done" (or the error) is broadcast
    return results[0] if is_main_process() else fn()


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics, ...) to every rank,
    in place, as DistributedDataParallel does before a forward pass."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src)


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place: one collective per dtype and device
    (the tensors are flattened into one buffer, as DDP's gradient buckets are)."""
    if not is_distributed() or not tensors:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def shutdown() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
