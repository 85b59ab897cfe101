"""Peak memory of a streamed analysis: 20,000 CIFAR-sized images cost no more than 2,000.

The data set generates each image from its index (3x32x32 float32 normal numbers drawn
from a generator seeded with the index, label index % 10), so it holds nothing in memory
itself; the model is a small CNN (a 4x4 stride-4 conv to 16 channels, a 3x3 conv to 32,
global average pooling, a linear head: 5,754 parameters), so that passes are quick (the
claim is about the data, not the model). For n = 2,000 and 20,000 images (--quick: 1,000
and 5,000) and each way of passing the data, a fresh subprocess (this script with the
hidden --child N flag) measures the peak memory growth during each step of
  - build: Objective(model, data); then its value(), grad() and hvp(v); then
  - trace: sharpscope.hessian_trace(model, data, samples=2) (its own objective: a build,
    a value pass and two HVP passes),
with data
  - streamed: DataLoader(data set, batch_size=256, shuffle=False), one batch at a time
    moved to the device;
  - in memory: the same images materialized on the device as one (x, y) pair of tensors
    in the build step (counted, as the whole set copied to the device when the objective
    was built was before streaming; batch_size=256 too): this peak grows by 12 KiB an image.
The baseline is taken after the model and the loader are built and one warm-up of the same
steps on one batch (one-time allocations: kernels, the autograd engine), so each step's
peak counts what earlier steps still hold. On the CPU: freed heap memory is returned
(malloc_trim), the resident-set high-water mark is reset (/proc/self/clear_refs) before each
step, and a step's peak is VmHWM minus VmRSS at the baseline (without /proc: ru_maxrss,
never reset, which also counts the warm-up's peak). The children run with glibc's
MALLOC_MMAP_THRESHOLD_=65536 (unless set already): otherwise glibc raises the threshold as
large blocks are freed, they stay in the heap, and the RSS peak of the same code depends on
the allocation history (27 MB apart between n = 1,000 and 5,000 here, the smaller n higher);
with it every tensor above 64 KiB is a mapping of its own, returned on free, and RSS follows
the memory in use. On CUDA: torch.cuda.max_memory_allocated, reset before each step, over
the allocated memory at the baseline.

It prints, for each n and way, each step's peak growth and time (value, grad, hvp: one
pass each; trace: three passes), and the growth of the streamed peaks from the smallest to
the largest n. The script exits with status 1 if any step's growth exceeds THRESHOLD_MB
(16 MB), or if the two ways disagree on L, |grad|, |Hv| or the trace (relative 1e-5).
16 MB: the 18,000 extra images are 211 MB (--quick: 4,000, 47 MB) and one batch of 256
is 3 MB; the noise between runs is about 2 MB, and holding 6 of the 70 extra batches (or
anything per batch of that size, e.g. their graphs) would exceed it.
Threads: 1 by default on the CPU, so that the times are steady on a shared machine (the
peak does not depend on it); --threads 0 keeps torch's default.

    python benchmarks/bench_streaming.py [--quick] [--threads 1] [--device cuda]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import sharpscope
from sharpscope.objective import Objective

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_objective import _rss_kb as _status_kb  # noqa: E402 - a sibling script

THRESHOLD_MB = 16.0  # allowed growth of the streamed peak from the smallest to the largest n
AGREEMENT = 1e-5  # max relative difference between streamed and in-memory results
BATCH = 256
SIZES = (2_000, 20_000)
QUICK_SIZES = (1_000, 5_000)
MODES = ("streamed", "memory")
STEPS = ("build", "value", "grad", "hvp", "trace")
LABELS = {"streamed": "streamed", "memory": "in memory"}
# glibc: allocations above this many bytes are mappings of their own, returned on free
MMAP_THRESHOLD = 65536


class GeneratedImages(torch.utils.data.Dataset):
    """``n`` CIFAR-sized images, each drawn from a generator seeded with its index: the
    same image on every pass, and nothing held in memory."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, 32, 32, generator=g), i % 10


def make_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 4, stride=4),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).to(device)


def materialize(loader: torch.utils.data.DataLoader, device: torch.device) -> tuple[Any, Any]:
    """The loader's examples as one (x, y) pair of tensors on ``device``."""
    n = len(loader.dataset)
    x = torch.empty(n, 3, 32, 32, device=device)
    y = torch.empty(n, dtype=torch.int64, device=device)
    start = 0
    for xb, yb in loader:
        x[start : start + len(xb)] = xb.to(device)
        y[start : start + len(yb)] = yb.to(device)
        start += len(xb)
    return x, y


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA calls return before the work is done


class PeakMeter:
    """Peak memory growth in MB over the memory at :meth:`start`, the high-water mark
    reset by :meth:`reset` (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        self.counter = "VmHWM"

    def start(self) -> None:
        gc.collect()
        _sync(self.device)
        if self.device.type == "cuda":
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _trim()
            rss = _status_kb("VmRSS")
            if rss is None or not _clear_refs():  # no /proc: ru_maxrss, never reset
                import resource

                self.counter = "ru_maxrss"
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.base = rss
        self.reset()

    def reset(self) -> None:
        """Start a new peak (from the memory in use now)."""
        gc.collect()
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.counter == "VmHWM":
            _trim()
            _clear_refs()

    def peak_mb(self) -> float:
        _sync(self.device)
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        if self.counter == "VmHWM":
            peak = _status_kb("VmHWM")
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak - self.base) / 1024


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back to the OS
    except (OSError, AttributeError):
        pass


def _clear_refs() -> bool:
    """Reset the resident-set high-water mark to the current RSS; whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def analysis(
    model: nn.Module, loader: torch.utils.data.DataLoader, mode: str, device: torch.device
) -> list[tuple[str, Callable[[], Any]]]:
    """The measured steps, in order, as (name, call); the calls share one objective."""
    held: dict[str, Any] = {}

    def data() -> Any:
        return loader if mode == "streamed" else held["data"]

    def build() -> Objective:
        if mode == "memory":
            held["data"] = materialize(loader, device)
        held["obj"] = Objective(model, data(), batch_size=BATCH)
        return held["obj"]

    def hvp() -> torch.Tensor:
        obj = held["obj"]
        v = torch.randn(obj.numel, generator=torch.Generator().manual_seed(1))
        return obj.hvp(v.to(device))

    def trace() -> float:
        return sharpscope.hessian_trace(model, data(), samples=2, batch_size=BATCH).value

    return [
        ("build", build),
        ("value", lambda: held["obj"].value()),
        ("grad", lambda: held["obj"].grad()),
        ("hvp", hvp),
        ("trace", trace),
    ]


def _scalar(out: Any) -> float:
    if isinstance(out, torch.Tensor):
        return out.double().norm().item()
    return float(out) if isinstance(out, int | float) else 0.0


def child(n: int, mode: str, device: torch.device) -> dict[str, Any]:
    """Peak growth during each step, time and result of each step, for ``n`` images."""
    model = make_model(device)
    loader = torch.utils.data.DataLoader(GeneratedImages(n), batch_size=BATCH, shuffle=False)
    # Warm-up: the same calls on the first batch only.
    warm = torch.utils.data.DataLoader(
        torch.utils.data.Subset(loader.dataset, range(BATCH)), batch_size=BATCH
    )
    for _, fn in analysis(model, warm, mode, device):
        fn()
    meter = PeakMeter(device)
    meter.start()
    peaks, seconds, results = {}, {}, {}
    for name, fn in analysis(model, loader, mode, device):
        meter.reset()
        start = time.perf_counter()
        out = fn()
        _sync(device)
        seconds[name] = time.perf_counter() - start
        results[name] = _scalar(out)
        del out
        peaks[name] = meter.peak_mb()
    return {"peaks": peaks, "seconds": seconds, "results": results, "counter": meter.counter}


def spawn(n: int, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(n), "--mode", mode]
    cmd += ["--device", str(args.device), "--threads", str(args.threads)]
    env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), **os.environ}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"--child {n} --mode {mode} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"n = {QUICK_SIZES} instead of {SIZES}"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (default 1; 0: torch's default)"
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"default {default_device}")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="streamed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.child is not None:  # a child process measuring one analysis
        print(json.dumps(child(args.child, args.mode, device)))
        return

    sizes = QUICK_SIZES if args.quick else SIZES
    numel = sum(p.numel() for p in make_model(torch.device("cpu")).parameters())
    print(
        f"small CNN ({numel} parameters), generated 3x32x32 float32 images, batch {BATCH}; "
        f"{device}, {torch.get_num_threads()} threads; a fresh process per row"
    )
    runs = {(n, mode): spawn(n, mode, args) for n in sizes for mode in MODES}
    counter = runs[sizes[0], MODES[0]]["counter"]
    if device.type == "cuda":
        what = "max_memory_allocated"
    elif counter == "VmHWM":
        what = f"VmHWM, reset before each step; MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"
    else:
        what = "ru_maxrss, cumulative"
    header = f"{'n':>7s} {'data':9s} " + " ".join(f"{s:>7s}" for s in STEPS)
    print(f"peak memory growth over the baseline during each step, MB ({what}):")
    print(header + f" {'max':>7s}")
    for n in sizes:
        for mode in MODES:
            peaks = runs[n, mode]["peaks"]
            cells = " ".join(f"{peaks[s]:7.1f}" for s in STEPS)
            print(f"{n:7d} {LABELS[mode]:9s} {cells} {max(peaks.values()):7.1f}")
    print("seconds per call (value, grad, hvp: one pass each; build: + materializing; trace: 3):")
    print(header)
    for n in sizes:
        for mode in MODES:
            seconds = runs[n, mode]["seconds"]
            print(f"{n:7d} {LABELS[mode]:9s} " + " ".join(f"{seconds[s]:7.2f}" for s in STEPS))

    lo, hi = sizes[0], sizes[-1]

    def growth(mode: str) -> dict[str, float]:
        return {s: runs[hi, mode]["peaks"][s] - runs[lo, mode]["peaks"][s] for s in STEPS}

    streamed, held = growth("streamed"), growth("memory")
    worst = max(STEPS, key=lambda s: streamed[s])
    data_mb = (hi - lo) * 3 * 32 * 32 * 4 / 2**20
    print(
        f"streamed({hi}) - streamed({lo}): {streamed[worst]:+.1f} MB at most ({worst}; "
        f"threshold {THRESHOLD_MB:.0f} MB); in memory: {min(held.values()):+.1f} MB at least "
        f"(the {hi - lo} extra images are {data_mb:.1f} MB)"
    )
    failed = False
    if streamed[worst] > THRESHOLD_MB:
        print(f"FAIL: the streamed peak grows with n by more than {THRESHOLD_MB:.0f} MB")
        failed = True
    disagree = []
    for n in sizes:
        a, b = runs[n, "streamed"]["results"], runs[n, "memory"]["results"]
        for step in ("value", "grad", "hvp", "trace"):
            diff = abs(a[step] - b[step]) / max(abs(b[step]), 1e-30)
            if not diff <= AGREEMENT:
                disagree.append(f"{step} at n={n}: relative difference {diff:.1e}")
    if disagree:
        print("FAIL: streamed and in-memory results differ: " + "; ".join(disagree))
        failed = True
    else:
        print("streamed and in-memory results agree (L, |grad|, |Hv|, trace)")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
