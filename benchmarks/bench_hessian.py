"""Hessian benchmark: HVP cost, and top-5 eigenvalues ours (Lanczos) vs PyHessian.

On a digits MLP (64-256-256-10, 85k parameters, trained for a few epochs with SGD) and
1024 training examples it prints:
  - HVP time / gradient time (exact double backward; about 2 is the floor),
  - Hessian-vector products and wall time for the top-5 eigenvalues to 1e-4 relative
    accuracy, against a tight ARPACK reference (scipy eigsh, tol 1e-10): sharpscope's
    Lanczos at tol 1e-4, and PyHessian's power iteration at the loosest of its
    tolerances (1e-3, 1e-4, ...) that reaches the same accuracy,
  - the ratios PyHessian / ours.

    python benchmarks/bench_hessian.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from sharpscope import TrainConfig, hessian_eigenvalues, load_checkpoint, load_dataset, train
from sharpscope.objective import Objective


def timed(fn, repeat=1):
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return out, (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and data")
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    width, samples, epochs = (64, 256, 2) if args.quick else (256, 1024, 10)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            optimizer="sgd", model="mlp", width=width, depth=2, epochs=epochs, device="cpu"
        )
        train(config, out + "/run", progress=False, quiet=True)
        model, meta = load_checkpoint(out + "/run/checkpoint.pt")
    x, y = load_dataset(meta["data"]).examples("train", samples)
    obj = Objective(model, (x, y), batch_size=samples)
    print(
        f"model: mlp 64-{width}-{width}-10, {obj.numel} parameters; {samples} examples; "
        f"{torch.get_num_threads()} threads"
    )
    v = torch.randn(obj.numel)
    obj.grad(), obj.hvp(v)  # warm up
    _, t_grad = timed(lambda: obj.grad(), 10)
    _, t_hvp = timed(lambda: obj.hvp(v), 10)
    print(
        f"gradient {t_grad * 1e3:.1f} ms, HVP {t_hvp * 1e3:.1f} ms: "
        f"HVP / gradient = {t_hvp / t_grad:.2f}"
    )

    k = args.k
    count = [0]

    def matvec(u):
        count[0] += 1
        return obj.hvp(torch.as_tensor(u, dtype=torch.float32)).double().numpy()

    op = LinearOperator((obj.numel, obj.numel), matvec=matvec, dtype=np.float64)
    (ref, _), t_ref = timed(lambda: eigsh(op, k=k, which="LA", tol=1e-10))
    ref = np.sort(ref)[::-1]
    print(
        f"reference ARPACK tol 1e-10: {count[0]} HVPs, {t_ref:.2f} s; top-{k}: "
        + ", ".join(f"{r:.6g}" for r in ref)
    )

    def error(values):
        return float(np.max(np.abs(np.asarray(values) - ref) / np.abs(ref)))

    ours, t_ours = timed(lambda: hessian_eigenvalues(obj, k=k, tol=1e-4))
    print(
        f"sharpscope lanczos tol 1e-4: {ours.hvp_count} HVPs, {t_ours:.2f} s, "
        f"max rel error {error(ours.eigenvalues):.1e}"
    )
    try:
        import pyhessian  # noqa: F401
    except ImportError:
        print("PyHessian not installed (pip install pyhessian): no comparison")
        return
    for tol in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
        theirs, t_theirs = timed(
            lambda tol=tol: hessian_eigenvalues(
                obj, k=k, method="pyhessian", tol=tol, max_iter=1000
            )
        )
        err = error(theirs.eigenvalues)
        print(
            f"PyHessian tol {tol:.0e}: {theirs.hvp_count} HVPs, {t_theirs:.2f} s, "
            f"max rel error {err:.1e}"
        )
        if err <= 1e-4:
            print(
                f"ratio PyHessian / sharpscope at 1e-4 accuracy: "
                f"HVPs {theirs.hvp_count / ours.hvp_count:.1f}x, "
                f"time {t_theirs / t_ours:.1f}x"
            )
            return
    print("PyHessian did not reach 1e-4 accuracy with tol down to 1e-7")


if __name__ == "__main__":
    main()
