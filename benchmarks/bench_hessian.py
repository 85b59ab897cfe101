"""Hessian benchmark: HVP cost, and the top-5 eigenvalues by Lanczos, ARPACK and PyHessian.

On one trained model (a digits MLP 64-256-256-10, 85k parameters, trained here with SGD
for a few epochs, or the model of --checkpoint) and 1024 training examples as one batch
it prints:
  - HVP time / gradient time, for a product from scratch (forward, backward with
    create_graph, backward: Objective.hvp) and from a gradient graph built once
    (Objective.hvp_operator, cache_graph=True; what PyHessian does for one batch); about 2 is
    the floor for the former,
  - a tight ARPACK run (scipy eigsh, tol 1e-10) as the reference top-5,
  - products, wall time and max relative error of the top-5 for: sharpscope's Lanczos
    at tol 1e-4; ARPACK at tol 1e-4 (the alternative to our Lanczos); PyHessian's power
    iteration at the loosest of its tolerances 1e-3, 1e-4, ... that reaches 1e-4
    relative error (its tolerance is on the relative change of the eigenvalue),
  - the ratios PyHessian / sharpscope (target: >= 3x in products and in time).
Times are the best of --repeat runs: other processes only ever add time.

    python benchmarks/bench_hessian.py [--quick] [--checkpoint run/checkpoint.pt] [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from sharpscope import TrainConfig, load_checkpoint, load_dataset, train
from sharpscope.hessian import hessian_eigenvalues
from sharpscope.objective import Objective

ACCURACY = 1e-4  # the relative accuracy of the measurements


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # CUDA calls return before the work is done


def best_time(fn: Callable[[], Any], repeat: int) -> tuple[Any, float]:
    """(last result, least wall time in seconds) over ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        _sync()
        start = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - start)
    return out, min(times)


def trained_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, Any]]:
    if args.checkpoint:
        return load_checkpoint(args.checkpoint, device=args.device)
    width, epochs = (64, 2) if args.quick else (256, 10)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            optimizer="sgd", model="mlp", width=width, depth=2, epochs=epochs, device="cpu"
        )
        train(config, out + "/run", progress=False, quiet=True)
        return load_checkpoint(out + "/run/checkpoint.pt", device=args.device)


def arpack(obj: Objective, k: int, tol: float) -> tuple[np.ndarray, int]:
    """Top-k by scipy eigsh on the cached-graph HVP; (eigenvalues largest first, HVPs)."""
    matvec = obj.hvp_operator(cache_graph=True)
    start = obj.hvp_count

    def apply(u: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.ravel(u)).to(obj.device, obj.accumulate_dtype)
        return matvec(v).double().cpu().numpy()

    op = LinearOperator((obj.numel, obj.numel), matvec=apply, dtype=np.float64)
    # A fixed start vector, as sharpscope's and PyHessian's runs are seeded too.
    v0 = np.random.default_rng(0).standard_normal(obj.numel)
    values = eigsh(op, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return np.sort(values)[::-1], obj.hvp_count - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, 256 examples")
    parser.add_argument("--checkpoint", help="a sharpscope checkpoint instead of training")
    parser.add_argument("--samples", type=int, help="examples (default 1024, quick 256)")
    parser.add_argument("--k", type=int, default=5, help="eigenvalues (default 5)")
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    samples = args.samples or (256 if args.quick else 1024)

    model, meta = trained_model(args)
    x, y = load_dataset(meta["data"]).examples("train", samples)
    # One batch, as PyHessian's `data`.
    obj = Objective(model, (x, y), batch_size=len(y), device=args.device)
    print(
        f"model: {meta['model'].get('name', '?')}, {obj.numel} parameters; {len(y)} examples; "
        f"{args.device}, {torch.get_num_threads()} threads"
    )

    v = torch.randn(obj.numel, generator=torch.Generator().manual_seed(0)).to(obj.w0)
    cached = obj.hvp_operator(cache_graph=True)
    obj.grad(), obj.hvp(v), cached(v)  # warm up
    _, t_grad = best_time(obj.grad, 5 * args.repeat)
    _, t_hvp = best_time(lambda: obj.hvp(v), 5 * args.repeat)
    _, t_cached = best_time(lambda: cached(v), 5 * args.repeat)
    print(
        f"gradient {t_grad * 1e3:.1f} ms; HVP from scratch {t_hvp * 1e3:.1f} ms "
        f"(HVP / gradient = {t_hvp / t_grad:.2f}); HVP on a cached graph "
        f"{t_cached * 1e3:.1f} ms (HVP / gradient = {t_cached / t_grad:.2f})"
    )

    k = args.k
    (ref, ref_hvps), t_ref = best_time(lambda: arpack(obj, k, 1e-10), 1)
    print(
        f"reference ARPACK tol 1e-10: {ref_hvps} HVPs, {t_ref:.2f} s; top-{k}: "
        + ", ".join(f"{r:.6g}" for r in ref)
    )

    def error(values: Any) -> float:
        return float(np.max(np.abs(np.asarray(values) - ref) / np.abs(ref)))

    ours, t_ours = best_time(lambda: hessian_eigenvalues(obj, k=k, tol=1e-4), args.repeat)
    print(
        f"sharpscope lanczos tol 1e-4: {ours.hvp_count} HVPs, {t_ours:.3f} s, "
        f"max rel error {error(ours.eigenvalues):.1e}, converged {ours.converged}"
    )
    (theirs_arpack, arpack_hvps), t_arpack = best_time(lambda: arpack(obj, k, 1e-4), args.repeat)
    print(
        f"ARPACK eigsh tol 1e-4:        {arpack_hvps} HVPs, {t_arpack:.3f} s, "
        f"max rel error {error(theirs_arpack):.1e}"
    )
    print(
        f"ratio ARPACK / sharpscope at tol 1e-4: HVPs {arpack_hvps / ours.hvp_count:.2f}x, "
        f"time {t_arpack / t_ours:.2f}x"
    )

    try:
        import pyhessian  # noqa: F401
    except ImportError:
        print("PyHessian not installed (pip install pyhessian): no comparison")
        return
    for tol in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8):
        theirs, t_theirs = best_time(
            lambda tol=tol: hessian_eigenvalues(
                obj, k=k, method="pyhessian", tol=tol, max_iter=1000
            ),
            args.repeat,
        )
        err = error(theirs.eigenvalues)
        print(
            f"PyHessian tol {tol:.0e}: {theirs.hvp_count} HVPs, {t_theirs:.3f} s, "
            f"max rel error {err:.1e}"
        )
        if err <= ACCURACY:
            print(
                f"ratio PyHessian / sharpscope at {ACCURACY:.0e} accuracy: "
                f"HVPs {theirs.hvp_count / ours.hvp_count:.1f}x, "
                f"time {t_theirs / t_ours:.1f}x"
            )
            return
    print(f"PyHessian did not reach {ACCURACY:.0e} accuracy with tol down to 1e-8")


if __name__ == "__main__":
    main()
