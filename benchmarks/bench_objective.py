"""Objective.grad / Objective.hvp against a hand-written autograd loop on a ResNet-18.

On the registry ResNet-18 (CIFAR variant, width 64: 11.2M parameters in 62 tensors, 10
classes, BatchNorm statistics set from the batch), one batch of --batch CIFAR-shaped random
images, eval mode, it prints:
  - time of Objective(model, (x, y), batch_size=B).grad() against the direct
    ``autograd.grad(F.cross_entropy(model(x), y), params)``, and the ratio ours / direct,
  - time of Objective.hvp(v) against the direct double backward
    ``g = autograd.grad(loss, params, create_graph=True); autograd.grad(g, params, v_parts)``
    and the ratio ours / direct (the issue's target: both ratios within 1.2 on the CPU),
  - peak memory of each call, ours and direct, and the ratio. On the CPU: each variant runs
    in a fresh subprocess (this script with the hidden --variant flag), which builds the
    model, data, v (and the Objective), makes one warm-up call, returns freed heap memory
    (malloc_trim), resets the resident-set high-water mark (/proc/self/clear_refs) and
    reports the peak RSS growth of one more call (VmHWM, the counter of ru_maxrss, which
    alone would also count the RSS this big parent had when spawning the child). On CUDA:
    torch.cuda.max_memory_allocated growth over the allocated memory before the call,
  - the agreement: max |ours - direct| / max |direct| for the gradient and the HVP; the
    script exits with status 1 if either exceeds 1e-3 (float32 rounding is ~1e-6).
The direct loop runs under the same exact_float32 context as the Objective (no TF32 on
CUDA). Calls are timed interleaved (ours, direct, ours, ...) after one warm-up each, and
the medians of --repeats are compared, so that load from other processes affects both alike.

    python benchmarks/bench_objective.py [--quick] [--batch 32] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from sharpscope.models import build_model
from sharpscope.objective import Objective, exact_float32

TOLERANCE = 1e-3  # max relative difference allowed between ours and direct
VARIANTS = ("ours-grad", "direct-grad", "ours-hvp", "direct-hvp")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA calls return before the work is done


def setup(batch: int, device: torch.device) -> tuple[torch.nn.Module, Any, Any, torch.Tensor]:
    """(model in eval mode, x, y, v): the same for every variant and process (seeded)."""
    torch.manual_seed(0)
    spec = {
        "name": "resnet18",
        "kwargs": {"input_shape": [3, 32, 32], "num_classes": 10, "width": 64},
    }
    model = build_model(spec).to(device)
    # CIFAR-shaped random images: timing does not depend on their content.
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(10, (batch,), device=device)
    # BatchNorm running statistics of this batch (cumulative average over one pass), so
    # that eval mode sees normalized activations and the loss is an ordinary one.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        model.train()
        model(x)
    model.eval()
    numel = sum(p.numel() for p in model.parameters())
    v = torch.randn(numel, generator=torch.Generator().manual_seed(1)).to(device)
    return model, x, y, v


def variants(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, which: str
) -> Callable[[], Any]:
    """The call measured as ``which`` (one of VARIANTS)."""
    params = list(model.parameters())
    v_parts = [
        t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params, strict=True)
    ]

    def direct_grad() -> tuple[torch.Tensor, ...]:
        with exact_float32():
            loss = F.cross_entropy(model(x), y)
            return torch.autograd.grad(loss, params)

    def direct_hvp() -> tuple[torch.Tensor, ...]:
        with exact_float32():
            loss = F.cross_entropy(model(x), y)
            g = torch.autograd.grad(loss, params, create_graph=True)
            return torch.autograd.grad(g, params, grad_outputs=v_parts)

    if which == "direct-grad":
        return direct_grad
    if which == "direct-hvp":
        return direct_hvp
    obj = Objective(model, (x, y), batch_size=len(y))
    if which == "ours-grad":
        return obj.grad
    if which == "ours-hvp":
        return lambda: obj.hvp(v)
    raise ValueError(which)


def _flat(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else torch.cat([t.reshape(-1) for t in out])


def rel_diff(ours: torch.Tensor, direct: torch.Tensor) -> float:
    return ((ours - direct).abs().max() / direct.abs().max()).item()


def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def measure_memory(which: str, batch: int, device: torch.device) -> dict[str, float]:
    """Peak memory growth, in MB, of one call of ``which`` (run in a fresh process)."""
    model, x, y, v = setup(batch, device)
    fn = variants(model, x, y, v, which)
    out = fn()  # warm-up: one-time allocations (kernels, autograd engine) are not counted
    del out
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return {"peak_mb": (torch.cuda.max_memory_allocated(device) - base) / 2**20}
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back to the OS
    except (OSError, AttributeError):
        pass
    import resource

    base = _rss_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current RSS
    except OSError:
        base = None
    if base is None:  # no /proc: ru_maxrss, which counts the warm-up's peak too
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    else:
        fn()
        peak = _rss_kb("VmHWM")
    return {"peak_mb": (peak - base) / 1024}


def spawn_memory(which: str, args: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--variant", which, "--batch", str(args.batch)]
    cmd += ["--device", str(args.device)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"--variant {which} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def time_pair(
    ours: Callable[[], Any], direct: Callable[[], Any], repeats: int, device: torch.device
) -> tuple[float, float, Any, Any]:
    """(median time ours, median time direct, last outputs): interleaved, after a warm-up."""
    times: dict[int, list[float]] = {0: [], 1: []}
    outs: list[Any] = [ours(), direct()]  # warm-up
    for _ in range(repeats):
        for i, fn in enumerate((ours, direct)):
            outs[i] = None  # free the previous result first
            _sync(device)
            start = time.perf_counter()
            outs[i] = fn()
            _sync(device)
            times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1]), outs[0], outs[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 8, 1 repeat (smoke run)")
    parser.add_argument("--batch", type=int, help="images per batch (default 32, quick 8)")
    parser.add_argument("--repeats", type=int, help="timed calls each (default 3, quick 1)")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"default {default_device}")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or (8 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    device = torch.device(args.device)

    if args.variant:  # a child process measuring memory
        print(json.dumps(measure_memory(args.variant, args.batch, device)))
        return

    model, x, y, v = setup(args.batch, device)
    params = list(model.parameters())
    print(
        f"resnet18 width 64: {sum(p.numel() for p in params)} parameters in {len(params)} "
        f"tensors; batch {args.batch}; {device}, {torch.get_num_threads()} threads; "
        f"median of {repeats}"
    )
    failed = False
    rows = []
    for kind in ("grad", "hvp"):
        ours_fn = variants(model, x, y, v, f"ours-{kind}")
        direct_fn = variants(model, x, y, v, f"direct-{kind}")
        t_ours, t_direct, out_ours, out_direct = time_pair(ours_fn, direct_fn, repeats, device)
        diff = rel_diff(_flat(out_ours).float(), _flat(out_direct).float())
        failed |= not diff <= TOLERANCE
        del out_ours, out_direct
        m_ours = spawn_memory(f"ours-{kind}", args)
        m_direct = spawn_memory(f"direct-{kind}", args)
        rows.append((kind, t_ours, t_direct, m_ours, m_direct, diff))

    print(
        f"{'':5s} {'ours ms':>9s} {'direct ms':>9s} {'ratio':>6s}   "
        f"{'ours MB':>8s} {'direct MB':>9s} {'ratio':>6s}   {'max rel diff':>12s}"
    )
    for kind, t_ours, t_direct, m_ours, m_direct, diff in rows:
        print(
            f"{kind:5s} {1e3 * t_ours:9.1f} {1e3 * t_direct:9.1f} {t_ours / t_direct:6.2f}   "
            f"{m_ours:8.1f} {m_direct:9.1f} {m_ours / max(m_direct, 1e-9):6.2f}   {diff:12.1e}"
        )
    print("time target: ratio <= 1.20; peak memory is the growth during one call")
    if failed:
        print(f"FAIL: ours and direct differ by more than {TOLERANCE:.0e} (relative)")
        sys.exit(1)


if __name__ == "__main__":
    main()
