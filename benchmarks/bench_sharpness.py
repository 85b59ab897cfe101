"""Sharpness benchmark: APGD step cost and convergence on a trained model.

Prints APGD time per step / gradient time (each step is one gradient of the whole set,
plus vector work and one final forward pass per run, so about 1 is the floor) and the
convergence check of docs/algorithms.md: the default N = 20 steps, 1 restart
against N = 100, R = 5 (a converged number moves by < 5%), for l2 at rho 0.05 and 0.1,
adaptive l2 at rho 0.1 and linf at rho 0.001.

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
    obj.grad()  # warm-up

    def seconds(fn, repeats: int = 3) -> float:
        # the fastest of a few runs: other processes only ever add time
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    t_grad = seconds(lambda: [obj.grad() for _ in range(5)]) / 5
    grads = sharpness(obj, rho=0.05, steps=20).grad_count  # 21: the start and 20 steps
    t_apgd = seconds(lambda: sharpness(obj, rho=0.05, steps=20)) / grads
    print(f"cnn on digits, {obj.numel} parameters, {samples} examples")
    print(
        f"gradient {t_grad * 1e3:.1f} ms; APGD per gradient step {t_apgd * 1e3:.1f} ms: "
        f"APGD step / gradient = {t_apgd / t_grad:.2f}"
    )
    # (norm, adaptive, rho): SAM's l2 radii, and the adaptive and linf settings of the
    # kind Andriushchenko et al. (2023) report (linf radii are per coordinate, hence small).
    settings = [("l2", False, 0.05), ("l2", False, 0.1), ("l2", True, 0.1), ("linf", False, 0.001)]
    for norm, adaptive, rho in settings:
        kwargs = {"rho": rho, "norm": norm, "adaptive": adaptive}
        short = sharpness(obj, steps=20, restarts=1, **kwargs)
        long = sharpness(obj, steps=100, restarts=5, **kwargs)
        change = abs(long.value - short.value) / abs(long.value)
        name = f"{norm}{' adaptive' if adaptive else ''} rho {rho}"
        print(
            f"{name}: N=20 R=1 {short.value:.6g}; N=100 R=5 {long.value:.6g}; "
            f"change {change:.2%} ({'converged' if change < 0.05 else 'NOT converged'})"
        )


if __name__ == "__main__":
    main()
