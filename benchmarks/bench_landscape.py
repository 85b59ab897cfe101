"""Landscape benchmark: grid time per point against one forward pass, and the vmap speedup.

For each model, on the same examples: the wall time of one forward pass over them
(eval mode, no grad, the bare module), then a 2-D grid through ``surface_2d`` one
point at a time and batched with torch.func.vmap over stacked weights. Prints the
ratios point / forward (the floor is about 1.0: every point needs one full pass) and
one-at-a-time / vmap (the batched-evaluation speedup; above 1 means vmap is faster),
and for BatchNorm models the cost of recalibrating the statistics at every point.

    python benchmarks/bench_landscape.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from sharpscope import build_model, load_dataset, model_spec
from sharpscope.directions import random_direction
from sharpscope.grid import grid_coordinates, surface_2d
from sharpscope.objective import Objective


def seconds(fn, repeat: int = 1) -> float:
    fn()  # warm up (allocator, kernels, vmap tracing)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def cases(quick: bool, device: torch.device):
    """(name, model, inputs, targets): small digits models; ResNet-18 on CIFAR-sized
    random images (a bigger model) unless --quick."""
    data = load_dataset("digits")
    for name, options, samples in (
        ("cnn", {}, 1024),
        ("cnn", {}, 128),
        ("mlp", {"width": 512}, 1024),
        ("mlp", {"width": 32}, 128),
        ("cnn", {"batchnorm": True}, 1024),
    ):
        torch.manual_seed(0)
        model = build_model(model_spec(name, data.input_shape, 10, **options))
        x, y = data.examples("train", samples)
        label = f"digits {name} {options or ''} {samples} ex".replace("  ", " ")
        yield label, model, x, y
    if not quick:
        torch.manual_seed(0)
        model = build_model(model_spec("resnet18", (3, 32, 32), 10, width=16))
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(256, 3, 32, 32, generator=g), torch.randint(10, (256,), generator=g)
        yield "resnet18 (width 16) 256 CIFAR-sized ex", model, x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 4 x 4 grid, small models only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    n = 4 if args.quick else 8
    coords = grid_coordinates(-1, 1, n)
    print(f"{n} x {n} grid on {device}; times per point, ratios to one forward pass")
    for label, model, x, y in cases(args.quick, device):
        model = model.to(device).eval()
        x, y = x.to(device), y.to(device)
        obj = Objective(model, (x, y), batch_size=len(y))  # one pass = one forward
        d1, d2 = random_direction(obj, seed=0), random_direction(obj, seed=0, index=1)
        with torch.no_grad():
            forward = seconds(lambda m=model, x=x: m(x), repeat=10)

        def grid(obj=obj, d1=d1, d2=d2, **kw):
            return lambda: surface_2d(obj, d1, d2, coords, coords, **kw)

        one = seconds(grid(batched=False)) / n**2
        vmap = seconds(grid(batched=True)) / n**2
        line = (
            f"{label} ({obj.numel} params): forward {forward * 1e3:.2f} ms; "
            f"point/forward {one / forward:.2f} one at a time, {vmap / forward:.2f} vmap; "
            f"vmap speedup {one / vmap:.2f}x"
        )
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            recal = seconds(grid(bn_batches=[(x, y)])) / n**2
            line += f"; BN recalibrated point/forward {recal / forward:.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
