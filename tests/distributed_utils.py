"""Run a function in N CPU processes joined by a gloo process group (for tests)."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def torchrun_sharpscope(
    args: list[str], world: int = 2, cwd: str = REPO
) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node world -m sharpscope *args`` on the CPU, output captured."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world)]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.run(
        [*command, "-m", "sharpscope", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
