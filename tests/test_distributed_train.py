"""Data-parallel training: 2 gloo processes on the CPU against one process.

Each spawn of processes costs seconds, so one spawned function runs several cases and
writes what each rank saw to files; the tests compare those with one-process runs and
hand-computed float64 steps.
"""

from __future__ import annotations

import functools
import gc
import importlib
import json
import math
import os
import subprocess

import pytest
import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from sharpscope.checkpoint import read_checkpoint
from sharpscope.cli import main
from sharpscope.data import data_spec, load_dataset
from sharpscope.errors import SharpscopeError
from sharpscope.runfolder import RunFolder
from sharpscope.train import train
from sharpscope.train_config import TrainConfig, resolve_config
from sharpscope.trainer import Trainer
from tests.distributed_utils import run_distributed, torchrun_sharpscope
from tests.test_train import TINY, _grad, _norm, _params

# the module (sharpscope.train the attribute is the function, re-exported by the package)
train_module = importlib.import_module("sharpscope.train")
WORLD = 2
# One float64 step: plain SGD (no momentum or decay) so that w' = w - lr * gradient.
STEP = {**TINY, "batch_size": 16, "momentum": 0.0, "weight_decay": 0.0, "lr": 0.1}


def bn_mlp(input_shape, num_classes, width: int = 8, depth: int = 1) -> nn.Module:
    """``--model tests.test_distributed_train:bn_mlp``: BatchNorm, no dropout."""
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.BatchNorm1d(width), nn.Tanh()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, num_classes))


def _float64_trainer(**options) -> Trainer:
    """The tiny problem in float64 (float32 with mixed precision)."""
    c = resolve_config(TrainConfig(**{**STEP, **options}))
    ds = load_dataset(data_spec(c.data, train_subset=c.train_subset))
    dtype = torch.float64 if c.amp in ("auto", "none") else None
    return Trainer(c, ds, torch.device("cpu"), dtype=dtype)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _on_ranks(fn):
    """A function for run_distributed that frees its garbage before the process group
    goes: a DDP module caught in a reference cycle (a traceback, a test's spy) that
    outlives the group aborts the process at exit."""

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            fn(*args)
        finally:
            gc.collect()

    return wrapper


def _counting_hook(calls: list[int]):
    """A DDP communication hook: the default all-reduce, counted in ``calls``."""

    def hook(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)

    return hook


# -- one step per case, on each rank --------------------------------------------------------
STEP_CASES = {
    "sgd": {"optimizer": "sgd"},
    "sam": {"optimizer": "sam", "rho": 0.3},  # one eps for the global batch
    "sam-local": {"optimizer": "sam", "rho": 0.3, "m": 8},  # m = B/N: eps per process
    "sam-m4": {"optimizer": "sam", "rho": 0.3, "m": 4},  # two micro-batches per process
    "gsam": {"optimizer": "gsam", "rho": 0.3, "gsam_alpha": 0.5},
    "gsam-local": {"optimizer": "gsam", "rho": 0.3, "gsam_alpha": 0.5, "m": 8},
    "sam-uneven": {"optimizer": "sam", "rho": 0.3, "batch_size": 15},  # shards of 7 and 8
    "sam-loss-decay": {"optimizer": "sam", "rho": 0.3, "m": 8, "weight_decay": 0.05,
                       "weight_decay_mode": "loss"},
    "sam-bf16": {"optimizer": "sam", "rho": 0.3, "amp": "bf16"},  # float32 model
}  # fmt: skip


@_on_ranks
def one_step_on_ranks(rank: int, world: int, out_dir: str) -> None:
    results = {}
    for name, options in STEP_CASES.items():
        t = _float64_trainer(**options)
        calls: list[int] = []  # DDP gradient all-reduces (one bucket: the model is tiny)
        t.ddp.register_comm_hook(None, _counting_hook(calls))
        eps = []
        if name.startswith("sam") or name.startswith("gsam"):
            perturbation = t.optimizer.perturbation

            def spy(perturbation=perturbation, eps=eps, t=t):
                e = perturbation()
                eps.append(_flat(e[p] for p in t.params))
                return e

            t.optimizer.perturbation = spy
        x, y = t.batch(0, 0, 0)
        loss_sum, correct, skipped = t.step(x, y, 0)
        results[name] = {
            "w": _flat(t.model.parameters()),
            "eps": eps,
            "allreduces": len(calls),
            "examples": len(y),
            "loss_sum": loss_sum.item(),
            "correct": int(correct),
        }
    torch.save(results, os.path.join(out_dir, f"steps{rank}.pt"))


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("steps")
    run_distributed(one_step_on_ranks, WORLD, str(out))
    return [torch.load(out / f"steps{r}.pt") for r in range(WORLD)]


def _one_process_step(**options) -> tuple[torch.Tensor, dict]:
    t = _float64_trainer(**options)
    x, y = t.batch(0, 0, 0)
    loss_sum, correct, _ = t.step(x, y, 0)
    return _flat(t.model.parameters()), {"loss_sum": loss_sum.item(), "correct": int(correct)}


@pytest.mark.parametrize("case", ["sgd", "sam", "sam-m4", "gsam", "gsam-local", "sam-uneven"])
def test_one_step_equals_the_one_process_step_on_the_global_batch(steps, case):
    expected, totals = _one_process_step(**STEP_CASES[case])
    for r in steps:
        torch.testing.assert_close(r[case]["w"], expected, rtol=1e-12, atol=1e-14)
        # the logged clean-pass totals are the global batch's
        assert r[case]["loss_sum"] == pytest.approx(totals["loss_sum"], rel=1e-6)  # float32 sum
        assert r[case]["correct"] == totals["correct"]
    assert [r["sam-uneven"]["examples"] for r in steps] == [7, 8]


def test_default_sam_all_reduces_the_first_pass_so_every_rank_has_the_global_eps(steps):
    t = _float64_trainer()
    x, y = t.batch(0, 0, 0)
    w = _params(t.model)
    g = _grad(t.model, w, x, y)  # the global batch's gradient
    expected = _flat(0.3 * g[k] / (_norm(g) + 1e-12) for k in w)
    eps = [r["sam"]["eps"][0] for r in steps]
    assert torch.equal(eps[0], eps[1])  # all-reduced: bit for bit the same
    torch.testing.assert_close(eps[0], expected, rtol=1e-12, atol=1e-15)
    assert [r["sam"]["allreduces"] for r in steps] == [2, 2]  # both passes
    assert [r["sgd"]["allreduces"] for r in steps] == [1, 1]


@pytest.mark.parametrize("case, wd", [("sam-local", 0.0), ("sam-loss-decay", 0.05)])
def test_local_eps_skips_the_first_all_reduce_and_averages_per_rank_sam_gradients(steps, case, wd):
    t = _float64_trainer()
    x, y = t.batch(0, 0, 0)
    w = _params(t.model)
    update = {k: torch.zeros_like(v) for k, v in w.items()}
    for r in range(WORLD):  # rank r's examples: the r-th half of the global batch
        xr, yr = x[8 * r : 8 * (r + 1)], y[8 * r : 8 * (r + 1)]
        g = _grad(t.model, w, xr, yr)
        g = {k: g[k] + wd * w[k] for k in w}  # "loss" mode: the L2 term enters eps
        eps = {k: 0.3 * g[k] / (_norm(g) + 1e-12) for k in w}
        torch.testing.assert_close(steps[r][case]["eps"][0], _flat(eps.values()), rtol=1e-12,
                                   atol=1e-15)  # fmt: skip
        w_eps = {k: w[k] + eps[k] for k in w}
        g_sam = _grad(t.model, w_eps, xr, yr)
        for k in w:
            update[k] += (g_sam[k] + wd * w_eps[k]) / WORLD
    expected = _flat(w[k] - 0.1 * update[k] for k in w)
    assert not torch.allclose(steps[0][case]["eps"][0], steps[1][case]["eps"][0])
    for r in steps:
        torch.testing.assert_close(r[case]["w"], expected, rtol=1e-12, atol=1e-14)
        # the second pass only (by hand when the decay at w + eps_r must be averaged)
        assert r[case]["allreduces"] == (1 if wd == 0 else 0)
    # and it is the one-process run with the same --m
    torch.testing.assert_close(
        steps[0][case]["w"], _one_process_step(**STEP_CASES[case])[0], rtol=1e-12, atol=1e-14
    )


def test_bf16_autocast_step_under_ddp_matches_the_one_process_step(steps):
    expected, _ = _one_process_step(**STEP_CASES["sam-bf16"])
    for r in steps:  # bf16 rounds activations to 8 bits of mantissa: 1e-3 of a 0.1 step
        torch.testing.assert_close(r["sam-bf16"]["w"], expected, rtol=0, atol=1e-3)
        assert r["sam-bf16"]["allreduces"] == 2
    torch.testing.assert_close(steps[0]["sam-bf16"]["w"], steps[1]["sam-bf16"]["w"], rtol=0,
                               atol=0)  # fmt: skip


def test_micro_batches_and_local_gsam_take_one_all_reduce_by_hand(steps):
    for r in steps:  # no DDP all-reduce: every pass local, one all-reduce of the average
        assert r["sam-m4"]["allreduces"] == 0 and r["gsam-local"]["allreduces"] == 0
        assert r["gsam"]["allreduces"] == 2


# -- BatchNorm, fp16 and refusals on ranks ------------------------------------------------------
@_on_ranks
def details_on_ranks(rank: int, world: int, out_dir: str) -> None:
    found: dict = {"no_sync": _no_sync_all_reduces(rank)}
    # BatchNorm: running statistics from the clean pass only, rank 0's everywhere.
    t = _float64_trainer(model="tests.test_distributed_train:bn_mlp", rho=0.3)
    x, y = t.batch(0, 0, 0)
    bn = t.model[2]
    found["state_before"] = {k: v.clone() for k, v in t.model.state_dict().items()}
    before = {k: v.clone() for k, v in t.model.named_buffers()}
    t.step(x, y, 0)
    found["bn_after_step"] = {k: v.clone() for k, v in t.model.named_buffers()}
    found["bn_before"] = before
    found["x"] = x
    t.evaluate("test")  # hands rank 0's statistics to every rank
    found["bn_after_eval"] = {k: v.clone() for k, v in t.model.named_buffers()}
    found["tracked"] = int(bn.num_batches_tracked)

    # fp16: a first pass that overflows on rank 1 only must skip the step on both.
    t = Trainer(
        resolve_config(TrainConfig(**{**STEP, "amp": "fp16", "m": 8})),
        load_dataset(data_spec("synthetic", train_subset=64)),
        torch.device("cpu"),
    )
    backward, seen = t._backward, []

    def overflowing(loss, bad, synced):
        seen.append(synced)
        bad = backward(loss, bad, synced)
        return bad | torch.tensor(rank == 1 and len(seen) == 1)

    t._backward = overflowing
    w = _flat(t.model.parameters())
    scale = t.scaler.get_scale()
    x, y = t.batch(0, 0, 0)
    _, _, skipped = t.step(x, y, 0)
    found["fp16"] = (bool(skipped), t.scaler.get_scale() / scale, seen)
    found["fp16_unchanged"] = torch.equal(_flat(t.model.parameters()), w)

    # refusals: every rank raises the same one-line error
    errors = []
    for options in ({"sync_bn": True, "model": "tests.test_distributed_train:bn_mlp"},
                    {"m": 24, "batch_size": 32}, {"m": 5, "batch_size": 15}):  # fmt: skip
        try:
            config = TrainConfig(**{**TINY, "epochs": 1, **options})
            train(config, os.path.join(out_dir, "no"), quiet=True)
        except SharpscopeError as exc:
            errors.append(str(exc))
    found["errors"] = errors
    found["wrote"] = os.path.exists(os.path.join(out_dir, "no"))
    torch.save(found, os.path.join(out_dir, f"details{rank}.pt"))


def _no_sync_all_reduces(rank: int) -> tuple[int, int]:
    """DDP all-reduces with no_sync() around the backward only, and around both passes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    ddp = DistributedDataParallel(model)
    calls: list[int] = []
    ddp.register_comm_hook(None, _counting_hook(calls))
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    loss = ddp(x).sum()  # forward outside no_sync (the widely copied tip) ...
    with ddp.no_sync():
        loss.backward()  # ... the backward still all-reduces
    backward_only = len(calls)
    model.zero_grad()
    with ddp.no_sync():  # forward and backward inside: no all-reduce
        ddp(x).sum().backward()
    return backward_only, len(calls) - backward_only


@pytest.fixture(scope="module")
def details(tmp_path_factory):
    out = tmp_path_factory.mktemp("details")
    run_distributed(details_on_ranks, WORLD, str(out))
    return [torch.load(out / f"details{r}.pt") for r in range(WORLD)]


def test_no_sync_only_takes_effect_when_it_wraps_the_forward_pass(details):
    """Why the trainer's local first pass runs forward and backward in no_sync():
    DDP decides in the forward pass whether the backward all-reduces
    (davda54/sam issue 78)."""
    for r in details:
        assert r["no_sync"] == (1, 0)


def test_batchnorm_statistics_come_from_rank_0s_clean_pass(details):
    model = bn_mlp((16,), 4).double()
    model.load_state_dict(details[0]["state_before"])
    for r in details:
        assert r["tracked"] == 1  # the perturbed pass did not count
    # rank 0's statistics are one momentum step from the initial ones on its own half
    batch_stats = model[1](model[0](details[0]["x"]))
    mean, var = batch_stats.mean(0), batch_stats.var(0)  # running_var is unbiased
    before = details[0]["bn_before"]
    after = details[0]["bn_after_step"]
    torch.testing.assert_close(after["2.running_mean"], 0.9 * before["2.running_mean"] + 0.1 * mean)
    torch.testing.assert_close(after["2.running_var"], 0.9 * before["2.running_var"] + 0.1 * var)
    for k, v in details[0]["bn_after_eval"].items():
        assert torch.equal(details[1]["bn_after_eval"][k], v), k


def test_fp16_ranks_agree_to_skip_when_one_rank_overflows(details):
    for r in details:
        skipped, backoff, synced = r["fp16"]
        assert skipped and backoff == 0.5 and r["fp16_unchanged"]
        assert synced == [False, True]  # local first pass, DDP second pass


def test_bad_distributed_options_fail_on_every_rank_before_writing(details):
    assert details[0]["errors"] == details[1]["errors"]
    sync_bn, m24, m5 = details[0]["errors"]
    assert "--sync-bn needs CUDA" in sync_bn
    assert "--m 24 under 2 processes" in m24 and "--m 16 gives each process its own eps" in m24
    assert "--batch-size 15 must split evenly" in m5
    assert not details[0]["wrote"]


# -- whole runs: equal to one process, rank 0 alone writes, resume ------------------------------
RUNS = {
    "sgd": {"optimizer": "sgd"},
    "sam": {"optimizer": "sam"},
    "sam-local": {"optimizer": "sam", "m": 8},
}
RUN = {**TINY, "batch_size": 16, "epochs": 3, "checkpoint_every": 3, "save_every": 5}
WRITERS = ("save_checkpoint", "write_json", "write_jsonl")  # the trainer's file writers
FOLDER_WRITERS = ("locked", "begin_fresh", "finish", "put_back")  # RunFolder's


def _recorded(name: str, write, writes: list[str]):
    def writer(*args, **kwargs):
        writes.append(name)
        return write(*args, **kwargs)

    return writer


@_on_ranks
def runs_on_ranks(rank: int, world: int, out_dir: str) -> None:
    writes: list[str] = []
    for name in WRITERS:  # record every call of the trainer's writers, on every rank
        setattr(train_module, name, _recorded(name, getattr(train_module, name), writes))
    for name in FOLDER_WRITERS:
        setattr(RunFolder, name, _recorded(name, getattr(RunFolder, name), writes))
    metrics = {}
    for name, options in RUNS.items():
        config = TrainConfig(**{**RUN, **options})
        metrics[name] = train(config, os.path.join(out_dir, name), quiet=True)
    # interrupted in step 7 (after the resume point at step 6) on every rank, resumed
    step = Trainer.step

    def interrupted(self, x, y, i):
        if i == 7:
            raise KeyboardInterrupt
        return step(self, x, y, i)

    config = TrainConfig(**{**RUN, **RUNS["sam"]})
    Trainer.step = interrupted
    for folder in ("cut", "cut-for-one-process"):
        try:
            train(config, os.path.join(out_dir, folder), quiet=True)
        except KeyboardInterrupt:
            pass
    Trainer.step = step
    metrics["cut"] = train(config, os.path.join(out_dir, "cut"), resume=True, quiet=True)
    torch.save({"writes": writes, "metrics": metrics}, os.path.join(out_dir, f"runs{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    run_distributed(runs_on_ranks, WORLD, str(out))
    return out, [torch.load(out / f"runs{r}.pt") for r in range(WORLD)]


def _weights(path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


def _assert_close_runs(a, b, atol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("name", list(RUNS))
def test_two_process_run_equals_the_one_process_run(runs, tmp_path, name):
    out, ranks = runs
    single = tmp_path / name
    metrics = train(TrainConfig(**{**RUN, **RUNS[name]}), single, quiet=True)
    # float32, 12 steps: equal up to summation order
    _assert_close_runs(out / name / "checkpoint.pt", single / "checkpoint.pt", atol=1e-5)
    got = ranks[0]["metrics"][name]
    assert got["world_size"] == 2 and metrics["world_size"] == 1
    assert ranks[1]["metrics"][name] == got  # every rank returns rank 0's metrics
    for key in ("train_loss", "train_eval_loss", "test_loss"):
        assert got[key] == pytest.approx(metrics[key], rel=1e-5), key
    assert got["test_accuracy"] == metrics["test_accuracy"]
    with open(out / name / "metrics.jsonl") as f:
        epochs = [r for r in map(json.loads, f) if r["kind"] == "epoch"]
    assert [r["step"] for r in epochs] == [4, 8, 12]


def test_only_rank_0_writes_the_run_folder(runs):
    out, ranks = runs
    assert ranks[1]["writes"] == [] and set(ranks[0]["writes"]) == {
        "save_checkpoint",
        "write_json",
        "write_jsonl",
        "locked",
        "begin_fresh",
        "finish",
    }
    assert sorted(os.listdir(out / "sam")) == [
        "checkpoint.pt",
        "config.json",
        "metrics.jsonl",
        "resume.pt",
        "trajectory",
    ]
    resume = read_checkpoint(out / "sam" / "resume.pt")["resume"]
    assert resume["world_size"] == 2 and resume["complete"]


def test_resume_under_two_processes_is_bit_identical(runs):
    out, _ = runs
    a, b = _weights(out / "sam" / "checkpoint.pt"), _weights(out / "cut" / "checkpoint.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with open(out / "sam" / "metrics.jsonl") as f, open(out / "cut" / "metrics.jsonl") as g:
        strip = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]
        assert strip == [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                         for line in g]  # fmt: skip


def test_a_two_process_run_resumes_in_one_process(runs, capsys):
    out, _ = runs
    cut = out / "cut-for-one-process"
    assert read_checkpoint(cut / "resume.pt")["resume"]["step"] == 6
    train(TrainConfig(**{**RUN, **RUNS["sam"]}), cut, resume=True)
    assert "the run used 2 processes, this one 1" in capsys.readouterr().out
    _assert_close_runs(cut / "checkpoint.pt", out / "sam" / "checkpoint.pt", atol=1e-5)


# -- torchrun -----------------------------------------------------------------------------------
def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    return torchrun_sharpscope(["train", *args], WORLD)


TORCHRUN = ["--data", "synthetic", "--train-subset", "64", "--model", "mlp"]
TORCHRUN += ["--width", "8", "--depth", "1", "--batch-size", "16", "--epochs", "2"]
TORCHRUN += ["--device", "cpu"]


def test_torchrun_command_line_run_equals_the_one_process_run(tmp_path):
    out = tmp_path / "torchrun"
    # --m-sharpness, not --m: torchrun's parser takes --m for an abbreviation of its own
    done = _torchrun([*TORCHRUN, "--m-sharpness", "8", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert sum(line.startswith("done:") for line in done.stdout.splitlines()) == 1  # rank 0
    config = TrainConfig(**{**TINY, "batch_size": 16, "epochs": 2, "m": 8})
    train(config, tmp_path / "one", quiet=True)
    _assert_close_runs(out / "checkpoint.pt", tmp_path / "one" / "checkpoint.pt", atol=1e-5)
    bad = _torchrun([*TORCHRUN, "--m-sharpness", "3", "--out", str(tmp_path / "bad")])
    assert bad.returncode != 0 and not (tmp_path / "bad").exists()
    assert bad.stderr.count("sharpscope train: error: --m 3 under 2 processes") == 1


def test_torchrun_resume_of_the_same_command_line_reads_the_folder_on_rank_0(tmp_path):
    # A resume point large enough (about 70 MB) that two ranks opening the folder at once
    # would find its lock taken.
    big = ["--data", "synthetic", "--train-subset", "64", "--model", "mlp", "--width", "3000"]
    big += ["--depth", "2", "--batch-size", "16", "--epochs", "2", "--quiet"]
    out = tmp_path / "run"
    step = Trainer.step

    def interrupted(self, x, y, i):
        if i == 5:
            raise KeyboardInterrupt
        return step(self, x, y, i)

    Trainer.step = interrupted
    try:
        assert main(["train", *big, "--checkpoint-every", "2", "--out", str(out)]) == 130
    finally:
        Trainer.step = step
    assert read_checkpoint(out / "resume.pt")["resume"]["step"] == 4
    for _ in range(2):  # again once complete: nothing to do
        done = _torchrun([*big, "--checkpoint-every", "2", "--out", str(out), "--resume"])
        assert done.returncode == 0, done.stderr
        assert "in use" not in done.stderr
    assert read_checkpoint(out / "resume.pt")["resume"]["complete"]
