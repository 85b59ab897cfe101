"""Sharpness benchmark: APGD step cost and convergence on a trained model.

Prints APGD time per step / gradient time (each step is one gradient, so about 1 is the
floor) and the convergence check of ALGORITHMS.md: the default N = 20 steps, 1 restart
against N = 100, R = 5 (a converged number moves by < 5%), at rho 0.05 and 0.1.

    python benchmarks/bench_sharpness.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from sharpscope import TrainConfig, load_checkpoint, load_dataset, sharpness, train
from sharpscope.objective import Objective


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    samples, epochs = (256, 3) if args.quick else (1024, 20)
    with tempfile.TemporaryDirectory() as out:
        train(TrainConfig(epochs=epochs, device="cpu"), out + "/run", progress=False, quiet=True)
        model, meta = load_checkpoint(out + "/run/checkpoint.pt")
    x, y = load_dataset(meta["data"]).examples("train", samples)
    obj = Objective(model, (x, y), accumulate_dtype=torch.float64)
    obj.grad()
    start = time.perf_counter()
    for _ in range(10):
        obj.grad()
    t_grad = (time.perf_counter() - start) / 10
    start = time.perf_counter()
    base = sharpness(obj, rho=0.05, steps=20)
    t_apgd = (time.perf_counter() - start) / base.grad_count
    print(f"cnn on digits, {obj.numel} parameters, {samples} examples")
    print(
        f"gradient {t_grad * 1e3:.1f} ms; APGD per gradient step {t_apgd * 1e3:.1f} ms: "
        f"APGD step / gradient = {t_apgd / t_grad:.2f}"
    )
    for rho in (0.05, 0.1):
        short = sharpness(obj, rho=rho, steps=20, restarts=1)
        long = sharpness(obj, rho=rho, steps=100, restarts=5)
        change = abs(long.value - short.value) / abs(long.value)
        print(
            f"rho {rho}: N=20 R=1 {short.value:.6g}; N=100 R=5 {long.value:.6g}; "
            f"change {change:.1%} ({'converged' if change < 0.05 else 'NOT converged'})"
        )


if __name__ == "__main__":
    main()
