"""Distributed analysis: 2 gloo processes on the CPU give the single-process numbers."""

import os

import pytest
import torch

from sharpscope.objective import Objective
from tests.distributed_utils import run_distributed


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
    local = sum(len(y) for _, y in obj.batches)
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


def analyses_on_ranks(rank, world, out_dir):
    from sharpscope.hessian import hessian_eigenvalues, hessian_trace
    from sharpscope.landscape import grid_coordinates, surface_2d
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
    from sharpscope.hessian import hessian_eigenvalues, hessian_trace
    from sharpscope.landscape import grid_coordinates, surface_2d
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
