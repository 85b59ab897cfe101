"""Landscape benchmark: grid time per point against one forward pass, and vmap speedup.

For the default digits CNN and a wider MLP, on the same examples, prints the wall time
of one forward pass over them (eval mode, no grad), the time per grid point one at a
time and batched with torch.func.vmap over stacked weights, and the ratios
point / forward (about 1.0 is the floor) and one-by-one / batched (the speedup).

    python benchmarks/bench_landscape.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import torch

from sharpscope import build_model, load_dataset, model_spec
from sharpscope.landscape import evaluate_points, random_direction
from sharpscope.objective import Objective


def per_call(fn, repeat):
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    points = 16 if args.quick else 64
    data = load_dataset("digits")
    for name, options, samples in (
        ("cnn", {}, 1024),
        ("mlp", {"width": 512}, 1024),
        ("cnn", {}, 128),
    ):
        torch.manual_seed(0)
        model = build_model(model_spec(name, data.input_shape, 10, **options)).eval()
        x, y = data.examples("train", samples)
        obj = Objective(model, (x, y), batch_size=samples)
        d = random_direction(obj, seed=0)
        W = torch.stack([obj.w0 + a * d for a in torch.linspace(-1, 1, points)])
        with torch.no_grad():
            t_forward = per_call(lambda m=model, x=x: m(x), 10)
        t_single = per_call(lambda o=obj, W=W: evaluate_points(o, W, batched=False), 1) / points
        t_batched = per_call(lambda o=obj, W=W: evaluate_points(o, W, batched=True), 1) / points
        print(
            f"{name} {options or ''} ({obj.numel} params, {samples} examples): forward "
            f"{t_forward * 1e3:.2f} ms; per point {t_single * 1e3:.2f} ms one-by-one, "
            f"{t_batched * 1e3:.2f} ms batched; point/forward {t_single / t_forward:.2f} "
            f"(batched {t_batched / t_forward:.2f}); vmap speedup {t_single / t_batched:.2f}x"
        )


if __name__ == "__main__":
    main()
