"""Distributed analysis: 2 gloo processes on the CPU give the single-process numbers."""

import os

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
