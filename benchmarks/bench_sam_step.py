"""SAM step time / SGD step time of the trainer, on the same model and batch.

A SAM step is two forward-backward passes, so 2.0 is the floor; what lies above it
is the cost of computing eps, saving and restoring w, and freezing BatchNorm. Steps
are timed interleaved (SGD, SAM, SGD, ...) and the medians compared, so that load
from other processes affects both alike.

    python benchmarks/bench_sam_step.py            # a few hundred steps per case
    python benchmarks/bench_sam_step.py --quick    # a smoke run
    python benchmarks/bench_sam_step.py --device cuda   # adds full ResNet-18, batch 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sharpscope.data import Dataset, load_dataset
from sharpscope.train_config import TrainConfig, resolve_config
from sharpscope.trainer import Trainer


def _dataset(name: str, batch: int, device: torch.device) -> Dataset:
    if name == "digits":
        return load_dataset("digits").to(device)
    # CIFAR-shaped random images: timing does not depend on their content.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(10, (batch,), generator=g)
    return Dataset("cifar-shaped", x, y, x[:2], y[:2], 10).to(device)


def _trainer(case: dict, optimizer: str, device: torch.device) -> Trainer:
    options = {k: v for k, v in case["config"].items()}
    if optimizer == "sgd":
        options.pop("m", None)
    c = resolve_config(TrainConfig(optimizer=optimizer, device=str(device), **options))
    return Trainer(c, _dataset(case["data"], options["batch_size"], device), device)


def _time_step(t: Trainer, x: torch.Tensor, y: torch.Tensor, step: int) -> float:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
    start = time.perf_counter()
    loss, _, _ = t.step(x, y, step)
    loss.item()  # wait for the step
    return time.perf_counter() - start


CASES = [
    {
        "name": "cnn / digits, batch 128",
        "data": "digits",
        "config": {"model": "cnn", "batch_size": 128},
    },
    {
        "name": "cnn / digits, batch 128, m = 16",
        "data": "digits",
        "config": {"model": "cnn", "batch_size": 128, "m": 16},
    },
    {
        "name": "resnet18 (width 16) / CIFAR-shaped, batch 32",
        "data": "cifar",
        "config": {"model": "resnet18", "width": 16, "batch_size": 32},
    },
]
# Issue 5's GPU figure: the full ResNet-18 (CIFAR variant) at batch 128, in float32 and
# in bf16 autocast (the default on CUDA). Too slow for a CPU benchmark.
CUDA_CASES = [
    {
        "name": "resnet18 / CIFAR-shaped, batch 128",
        "data": "cifar",
        "config": {"model": "resnet18", "batch_size": 128},
    },
    {
        "name": "resnet18 / CIFAR-shaped, batch 128, bf16",
        "data": "cifar",
        "config": {"model": "resnet18", "batch_size": 128, "amp": "bf16"},
    },
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps (smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per optimizer")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps = args.steps or (5 if args.quick else 50)
    print(f"device {device}, {torch.get_num_threads()} thread(s), {steps} timed steps each")
    print(f"{'case':48s} {'SGD ms':>8s} {'SAM ms':>8s} {'SAM/SGD':>8s}")
    for case in CASES + (CUDA_CASES if device.type == "cuda" else []):
        sgd, sam = _trainer(case, "sgd", device), _trainer(case, "sam", device)
        sam.model.load_state_dict(sgd.model.state_dict())
        x, y = sgd.batch(0, 0, 0)
        for i in range(2):  # warm-up
            _time_step(sgd, x, y, i)
            _time_step(sam, x, y, i)
        t_sgd, t_sam = [], []
        for i in range(steps):
            t_sgd.append(_time_step(sgd, x, y, i))
            t_sam.append(_time_step(sam, x, y, i))
        a, b = statistics.median(t_sgd), statistics.median(t_sam)
        print(f"{case['name']:48s} {1e3 * a:8.2f} {1e3 * b:8.2f} {b / a:8.2f}")
    print("floor: 2.00 (two forward-backward passes per SAM step)")


if __name__ == "__main__":
    main()
