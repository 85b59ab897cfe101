"""Wall time of a 2-D landscape grid in 1 process against 2 processes (torchrun, gloo).

Trains the default digits model into a temporary folder, then times
``sharpscope landscape CKPT --dim 2`` alone and under
``python -m torch.distributed.run --nproc_per_node 2`` in both ways of splitting the
work: ``--distribute points`` (the default: each process evaluates half the grid
points on all the examples) and ``--distribute examples`` (every point on both
processes, each on half the examples, sums all-reduced); checks the grids agree with
the one-process grid and prints the ratios. The process start (import torch, join the
group, load the checkpoint) is in every timing.

    python benchmarks/bench_distributed_landscape.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from sharpscope import TrainConfig, train
from sharpscope.surface import load_surface


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    points, samples = ("7", "256") if args.quick else ("21", "1347")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        train(
            TrainConfig(epochs=2 if args.quick else 20, device="cpu"),
            tmp + "/run",
            progress=False,
            quiet=True,
        )
        common = [
            "-m",
            "sharpscope",
            "landscape",
            tmp + "/run/checkpoint.pt",
            "--dim",
            "2",
            "--samples",
            samples,
            "--quiet",
        ]

        def run(mode: str, grid_points: str) -> tuple[float, np.ndarray]:
            out = f"{tmp}/{mode}{grid_points}.npz"
            command = [sys.executable]
            if mode != "one":
                command += ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
                command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
            command += common + ["--points", grid_points, "--out", out]
            command += [] if mode == "one" else ["--distribute", mode]
            start = time.perf_counter()
            subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
            return time.perf_counter() - start, load_surface(out).loss

        timings, grids, fixed = {}, {}, {}
        for mode in ("one", "points", "examples"):
            timings[mode], grids[mode] = run(mode, points)
            fixed[mode], _ = run(mode, "1")  # start, group, checkpoint, 1 point
        print(
            f"{points}x{points} grid on {samples} examples, 1 process: {timings['one']:.1f} s "
            f"({fixed['one']:.1f} s of it to start and evaluate 1 point)"
        )
        for mode in ("points", "examples"):
            grid_one = timings["one"] - fixed["one"]
            grid_two = timings[mode] - fixed[mode]
            print(
                f"2 processes, --distribute {mode}: {timings[mode]:.1f} s "
                f"({fixed[mode]:.1f} s to start); "
                f"ratio 1/2 = {timings['one'] / timings[mode]:.2f}, "
                f"grid alone {grid_one / grid_two:.2f}; "
                f"max |difference| {np.abs(grids[mode] - grids['one']).max():.1e}"
            )


if __name__ == "__main__":
    main()
