"""Distributed analysis: 2 gloo processes on the CPU give the single-process numbers."""

import os

import numpy as np
import pytest
import torch

from sharpscope.objective import Objective
from tests.distributed_utils import run_distributed, torchrun_sharpscope


def make_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(25, 4, generator=g, dtype=torch.float64)  # 25: uneven shards
    y = torch.randint(3, (25,), generator=g)
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=g, dtype=torch.float64)
    return model, (x, y), v


def objective_on_ranks(rank, world, out_dir):
    model, data, v = make_problem()
    obj = Objective(model, data, batch_size=7)
    assert obj.distributed and obj.n_examples == 25
    local = sum(len(y) for _, y in obj.batches())
    value, grad = obj.value_and_grad()
    torch.save(
        {"local": local, "value": value, "grad": grad, "hvp": obj.hvp(v), **obj.evaluate()},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


def test_sharded_objective_equals_single_process(tmp_path):
    run_distributed(objective_on_ranks, 2, str(tmp_path))
    model, data, v = make_problem()
    single = Objective(model, data, batch_size=7)
    value, grad = single.value_and_grad()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert sorted(r["local"] for r in ranks) == [12, 13]  # each rank saw its own shard
    for r in ranks:
        assert abs(r["value"] - value) < 1e-13
        torch.testing.assert_close(r["grad"], grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r["hvp"], single.hvp(v), rtol=1e-12, atol=1e-14)
        assert r["accuracy"] == single.evaluate()["accuracy"]


def streamed_on_ranks(rank, world, out_dir):
    from torch.utils.data import DataLoader, TensorDataset

    from sharpscope.sharpness import sharpness

    model, (x, y), v = make_problem()
    obj = Objective(model, DataLoader(TensorDataset(x, y), batch_size=7))
    assert obj.distributed and obj.n_examples == 25
    local = sum(len(b[1]) for b in obj.batches())
    value, grad = obj.value_and_grad()
    result = {"local": local, "value": value, "grad": grad, "hvp": obj.hvp(v)}
    result["sharpness"] = sharpness(obj, rho=0.1, steps=3, m=5).value
    torch.save(result, os.path.join(out_dir, f"streamed{rank}.pt"))


def test_streamed_data_is_dealt_out_by_batches_and_gives_the_single_process_numbers(tmp_path):
    """A DataLoader under 2 processes: rank r passes over batches r, r + 2, ... (7, 7 and
    4 examples: 14 and 11), and every sum equals one process's up to summation order.
    m-sharpness gathers the streamed examples back in order, as one process forms them."""
    from sharpscope.sharpness import sharpness

    run_distributed(streamed_on_ranks, 2, str(tmp_path))
    model, data, v = make_problem()
    single = Objective(model, data, batch_size=7)
    value, grad = single.value_and_grad()
    ranks = [torch.load(tmp_path / f"streamed{r}.pt") for r in range(2)]
    assert [r["local"] for r in ranks] == [14, 11]
    for r in ranks:
        assert abs(r["value"] - value) < 1e-13
        torch.testing.assert_close(r["grad"], grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r["hvp"], single.hvp(v), rtol=1e-12, atol=1e-14)
        assert r["sharpness"] == pytest.approx(
            sharpness(single, rho=0.1, steps=3, m=5).value, rel=1e-9
        )


def analyses_on_ranks(rank, world, out_dir):
    from sharpscope.grid import grid_coordinates, surface_2d
    from sharpscope.hessian import hessian_eigenvalues, hessian_trace
    from sharpscope.sharpness import sharpness

    model, data, v = make_problem()
    obj = Objective(model, data, batch_size=7)
    coords = grid_coordinates(-1, 1, 5)
    d2 = torch.roll(v, 1)
    result = {
        "eigs": hessian_eigenvalues(obj, k=2).eigenvalues,
        "trace": hessian_trace(obj, samples=5).value,
        "sharpness": sharpness(obj, rho=0.1, steps=5).value,
        "grid": surface_2d(obj, v, d2, coords, coords, batched=False).loss,
    }
    torch.save(result, os.path.join(out_dir, f"analysis{rank}.pt"))


def test_distributed_hessian_sharpness_and_grid_equal_single_process(tmp_path):
    from sharpscope.grid import grid_coordinates, surface_2d
    from sharpscope.hessian import hessian_eigenvalues, hessian_trace
    from sharpscope.sharpness import sharpness

    run_distributed(analyses_on_ranks, 2, str(tmp_path))
    model, data, v = make_problem()
    obj = Objective(model, data, batch_size=7)
    coords = grid_coordinates(-1, 1, 5)
    single = {
        "eigs": hessian_eigenvalues(obj, k=2).eigenvalues,
        "trace": hessian_trace(obj, samples=5).value,
        "sharpness": sharpness(obj, rho=0.1, steps=5).value,
        "grid": surface_2d(obj, v, torch.roll(v, 1), coords, coords, batched=False).loss,
    }
    for r in range(2):
        got = torch.load(tmp_path / f"analysis{r}.pt", weights_only=False)
        for key in ("eigs", "trace", "sharpness"):
            assert got[key] == pytest.approx(single[key], rel=1e-10), key
        assert abs(got["grid"] - single["grid"]).max() < 1e-12


# -- landscape grid points split over the ranks ------------------------------------------------
class _Interrupt(Exception):
    pass


def grid_split_on_ranks(rank, world, out_dir):
    from sharpscope import grid
    from sharpscope.grid import grid_coordinates, surface_2d

    model, data, v = make_problem()
    obj = Objective(model, data, batch_size=7, distributed=False)  # every rank: all examples
    coords = grid_coordinates(-1, 1, 7)  # 49 points: 25 on rank 0, 24 on rank 1
    calls = []
    evaluate = obj.evaluate

    def counted(w=None, buffers=None):
        calls.append(1)
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt  # as a Ctrl-C reaching every rank under torchrun
        return evaluate(w, buffers)

    obj.evaluate = counted
    partial = os.path.join(out_dir, "grid.partial.npz")
    # Interrupted in the third round of SPLIT_ROUND_CHUNKS points per rank: the first two
    # rounds (4 x SPLIT_ROUND_CHUNKS points) were summed onto rank 0 and saved.
    stop_after = 2 * grid.SPLIT_ROUND_CHUNKS + 3
    with pytest.raises(KeyboardInterrupt):
        surface_2d(obj, v, torch.roll(v, 1), coords, coords, batched=False, resume_path=partial)
    first = len(calls)
    calls.clear()
    stop_after = None
    surface = surface_2d(
        obj, v, torch.roll(v, 1), coords, coords, batched=False, resume_path=partial
    )
    torch.save(
        {"loss": surface.loss, "accuracy": surface.accuracy, "calls": (first, len(calls))},
        os.path.join(out_dir, f"split{rank}.pt"),
    )


def test_grid_points_split_over_ranks_resume_and_equal_one_process_bit_for_bit(tmp_path):
    from sharpscope import grid
    from sharpscope.grid import grid_coordinates, surface_2d

    run_distributed(grid_split_on_ranks, 2, str(tmp_path))
    model, data, v = make_problem()
    obj = Objective(model, data, batch_size=7)
    coords = grid_coordinates(-1, 1, 7)
    single = surface_2d(obj, v, torch.roll(v, 1), coords, coords, batched=False)
    saved = 2 * 2 * grid.SPLIT_ROUND_CHUNKS  # two rounds on two ranks, kept by rank 0
    results = [torch.load(tmp_path / f"split{r}.pt", weights_only=False) for r in range(2)]
    for r, got in enumerate(results):
        # Each point evaluated on all 25 examples by one rank: the one-process numbers.
        assert (got["loss"] == single.loss).all() and (got["accuracy"] == single.accuracy).all()
        first, second = got["calls"]
        assert first == 2 * grid.SPLIT_ROUND_CHUNKS + 3 + 1  # the call that raised
        assert second == ((49 - saved) - r + 1) // 2  # only the rest, dealt out again
    assert not (tmp_path / "grid.partial.npz").exists()  # removed once the grid is done


def test_torchrun_landscape_equals_the_one_process_landscape(tmp_path):
    from sharpscope import TrainConfig, train
    from sharpscope.cli import main
    from sharpscope.surface import load_surface

    config = TrainConfig(data="synthetic", train_subset=64, model="mlp", width=8, depth=1)
    train(TrainConfig(**{**vars(config), "epochs": 1, "device": "cpu"}), tmp_path / "run")
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    grid = [ckpt, "--dim", "2", "--points", "6", "5", "--samples", "50", "--quiet"]
    assert main(["landscape", *grid, "--out", str(tmp_path / "one.npz")]) == 0
    one = load_surface(tmp_path / "one.npz")
    for mode, exact in (("points", True), ("examples", False)):
        out = tmp_path / f"{mode}.npz"
        done = torchrun_sharpscope(["landscape", *grid, "--distribute", mode, "--out", str(out)])
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("wrote ") == 1  # rank 0 alone writes and prints
        got = load_surface(out)
        assert got.settings["processes"] == 2 and got.settings["distribute"] == mode
        if exact:  # every point on all the examples by one process: the same sums
            assert (got.loss == one.loss).all() and (got.accuracy == one.accuracy).all()
        else:  # two half sums added: the same up to float32 summation order
            np.testing.assert_allclose(got.loss, one.loss, rtol=1e-5)
            assert (got.accuracy == one.accuracy).all()
    assert sorted(os.listdir(tmp_path)) == ["examples.npz", "one.npz", "points.npz", "run"]


def test_torchrun_measure_equals_the_one_process_measure(tmp_path):
    import json

    from sharpscope import TrainConfig, train
    from sharpscope.cli import main

    config = TrainConfig(data="synthetic", train_subset=64, model="mlp", width=8, depth=1)
    train(TrainConfig(**{**vars(config), "epochs": 1, "device": "cpu"}), tmp_path / "run")
    args = [str(tmp_path / "run" / "checkpoint.pt"), "--samples", "50", "--batch-size", "16"]
    args += ["--steps", "5", "--trace-samples", "10", "--quiet", "--device", "cpu"]
    assert main(["measure", *args, "--json", str(tmp_path / "one.json")]) == 0
    done = torchrun_sharpscope(["measure", *args, "--json", str(tmp_path / "two.json")])
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("train loss") == 1  # one table, from rank 0
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    a, b = one["results"][0], two["results"][0]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert b["accuracy"] == a["accuracy"]
    assert b["sharpness"][0]["value"] == pytest.approx(a["sharpness"][0]["value"], rel=1e-3)
    eig_a, eig_b = a["hessian"]["eigenvalues"], b["hessian"]["eigenvalues"]
    assert eig_b == pytest.approx(eig_a, rel=1e-4)
    assert b["hessian"]["trace"]["value"] == pytest.approx(a["hessian"]["trace"]["value"], rel=1e-4)
