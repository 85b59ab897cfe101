"""Wall time of a 2-D landscape grid in 1 process against 2 processes (torchrun, gloo).

Trains the default digits model into a temporary folder, then times
``sharpscope landscape CKPT --dim 2`` alone and under
``python -m torch.distributed.run --nproc_per_node 2`` (examples sharded over the two
processes, sums all-reduced), checks the two grids agree, and prints the ratio.

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
from sharpscope.landscape import load_surface


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
            "--points",
            points,
            "--samples",
            samples,
            "--quiet",
        ]
        timings = {}
        for n in (1, 2):
            out = f"{tmp}/grid{n}.npz"
            command = [sys.executable]
            if n > 1:
                command += [
                    "-m",
                    "torch.distributed.run",
                    "--nproc_per_node",
                    str(n),
                    "--master_addr",
                    "127.0.0.1",
                    "--master_port",
                    str(free_port()),
                ]
            command += common
            start = time.perf_counter()
            subprocess.run(command + ["--out", out], check=True, env=env, stdout=subprocess.DEVNULL)
            timings[n] = time.perf_counter() - start
        a, b = load_surface(f"{tmp}/grid1.npz").loss, load_surface(f"{tmp}/grid2.npz").loss
        print(
            f"{points}x{points} grid on {samples} examples: 1 process {timings[1]:.1f} s, "
            f"2 processes {timings[2]:.1f} s; ratio 1/2 = {timings[1] / timings[2]:.2f}; "
            f"max |difference| {np.abs(a - b).max():.1e}"
        )


if __name__ == "__main__":
    main()
