"""Data-parallel SAM step time / SGD step time, global-batch eps against per-process eps.

Run under torchrun (GPUs with NCCL, or CPU processes with gloo)::

    torchrun --nproc_per_node 2 benchmarks/bench_ddp_sam.py            # ~100 steps each
    torchrun --nproc_per_node 2 benchmarks/bench_ddp_sam.py --quick    # a smoke run

Each process times the trainer's step on its slice of the same global batch; the
medians of rank 0 are printed. SAM with one eps for the global batch all-reduces both
passes; with --m B/N (each process its own eps) only the second, so its ratio to SGD
is the lower. Steps are interleaved (SGD, SAM, SAM-local, SGD, ...) so that load from
other processes affects all alike. Run it also with --nproc_per_node 1 to get the
one-process times to compare with (the printed ratios are within one run).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sharpscope import distributed
from sharpscope.data import Dataset
from sharpscope.train_config import TrainConfig, resolve_config
from sharpscope.trainer import Trainer


def _cifar_shaped(batch: int) -> Dataset:
    # Random images of CIFAR-10's shape: step time does not depend on their content.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(10, (batch,), generator=g)
    return Dataset("cifar-shaped", x, y, x[:2], y[:2], 10)


def _time_step(t: Trainer, x: torch.Tensor, y: torch.Tensor, step: int) -> float:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
    start = time.perf_counter()
    loss, _, _ = t.step(x, y, step)
    loss.item()  # wait for the step
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps (smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case")
    parser.add_argument("--model", default="resnet18", help="(default: %(default)s)")
    parser.add_argument("--width", type=int, default=None, help="model width (default: its own)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto", help="auto = bf16 on CUDA (default)")
    args = parser.parse_args()
    if args.quick:
        args.width = args.width or 8
        args.batch_size = min(args.batch_size, 32)
    from sharpscope.devices import resolve_device

    device = distributed.init_from_environment(resolve_device(args.device))
    world = distributed.world_size()
    steps = args.steps or (3 if args.quick else 100)
    common = {"model": args.model, "width": args.width, "batch_size": args.batch_size}
    common.update(device=str(device), amp=args.amp)
    per = args.batch_size // world
    cases = {
        "SGD": {"optimizer": "sgd"},
        "SAM (global eps)": {"optimizer": "sam"},
        f"SAM (--m {per}, own eps)": {"optimizer": "sam", "m": per if world > 1 else None},
    }
    data = _cifar_shaped(args.batch_size)
    trainers = {}
    for name, options in cases.items():
        c = resolve_config(TrainConfig(data="synthetic", **common, **options))
        trainers[name] = Trainer(c, data, device)
    x, y = trainers["SGD"].batch(0, 0, 0)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(steps + 2):
        for name, t in trainers.items():
            elapsed = _time_step(t, x, y, i)
            if i >= 2:  # two warm-up steps
                times[name].append(elapsed)
    if distributed.is_main_process():
        print(
            f"{world} process(es) on {device} ({trainers['SGD'].c.amp} amp), {args.model}, "
            f"global batch {args.batch_size} ({per} per process), {steps} timed steps each"
        )
        base = statistics.median(times["SGD"])
        print(f"{'case':32s} {'ms':>8s} {'/ SGD':>8s}")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{name:32s} {1e3 * median:8.2f} {median / base:8.2f}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
