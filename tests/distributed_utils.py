"""Run a function in N CPU processes joined by a gloo process group (for tests)."""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, fn: Callable, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        # A DDP module kept alive in a reference cycle past the group's end aborts the
        # process at exit; collect it first.
        gc.collect()
        dist.destroy_process_group()


def run_distributed(fn: Callable, world: int = 2, *args) -> None:
    """Call ``fn(rank, world, *args)`` in ``world`` processes; ``fn`` must be importable
    (a module-level function) and reports results by writing files."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(world, init_file, fn, args), nprocs=world, join=True)
