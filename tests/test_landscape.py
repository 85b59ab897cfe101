"""Landscapes: directions against their definitions, surfaces against exact values,
resume, the user's model left alone, the .npz format and the CLI's errors."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

import sharpscope.grid as ls
from sharpscope.checkpoint import save_checkpoint
from sharpscope.cli import main
from sharpscope.data import data_spec, load_dataset
from sharpscope.directions import (
    cosine,
    hessian_directions,
    interpolation_direction,
    normalize_direction,
    orthogonalize,
    parameter_layout,
    random_direction,
    raw_direction,
    trajectory_checkpoints,
    trajectory_directions,
)
from sharpscope.errors import SharpscopeError
from sharpscope.grid import (
    AUTO_START,
    BatchNormRecalibrator,
    PointEvaluator,
    auto_range,
    evaluate_points,
    grid_coordinates,
    interpolation,
    surface_1d,
    surface_2d,
)
from sharpscope.landscape import interpolation_for_checkpoints, landscape_for_checkpoint
from sharpscope.losses import mse
from sharpscope.models import build_model, model_spec
from sharpscope.objective import Objective
from sharpscope.settings import INTERPOLATION_POINTS
from sharpscope.surface import Surface, load_surface, summarize_draws
from sharpscope.train import TrainConfig, train

FAST = ["--samples", "32", "--quiet"]
REAL_EVALUATE = PointEvaluator.__call__  # tests wrap it to count or interrupt points


def save(path, name="cnn", seed=0, batchnorm=False, **options):
    """A digits checkpoint of an untrained model; BatchNorm ones get running statistics
    of their own (a few train-mode passes on seeded inputs)."""
    torch.manual_seed(seed)
    if batchnorm:
        options["batchnorm"] = True
    spec = model_spec(name, (1, 8, 8), 10, **options)
    model = build_model(spec)
    if batchnorm:
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(16, 1, 8, 8) * (1 + seed) + seed)
    model.eval()
    payload = {"model": spec, "data": data_spec("digits"), "config": {}, "metrics": {}}
    save_checkpoint(path, {**payload, "state_dict": model.state_dict()})
    return model


def digits(n=32, seed=0, split="train"):
    return load_dataset("digits").examples(split, n, seed=seed)


def snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
    )


def assert_unchanged(model: nn.Module, before) -> None:
    state, flags = before
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == flags


# -- directions -------------------------------------------------------------------------------
def test_filter_normalization_gives_each_filter_the_norm_of_ws(tiny_bn_cnn, tiny_image_data):
    obj = Objective(tiny_bn_cnn, tiny_image_data)
    raw = raw_direction(obj.layout, 0, obj.w0.dtype)
    d = normalize_direction(raw, obj.w0, obj.layout)
    parts, weights, raws = (obj.layout.unflatten(v) for v in (d, obj.w0, raw))
    for name, shape in zip(obj.layout.names, obj.layout.shapes, strict=True):
        if len(shape) > 1:  # conv filters (3, 1, 3, 3) and linear rows (3, 48)
            got = parts[name].reshape(shape[0], -1).norm(dim=1)
            want = weights[name].reshape(shape[0], -1).norm(dim=1)
            r = raws[name].reshape(shape[0], -1).norm(dim=1)
            # ||d_j|| = ||w_j|| ||r_j|| / (||r_j|| + 1e-10) (Li et al. 2018, Sec. 4)
            torch.testing.assert_close(got, want * r / (r + 1e-10), rtol=1e-14, atol=0)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
        else:  # biases and BN affine parameters stay put by default
            assert torch.count_nonzero(parts[name]) == 0
    # the module and its Objective give the same direction
    assert torch.equal(random_direction(tiny_bn_cnn, seed=0), d)
    assert torch.equal(random_direction(obj, seed=0), d)


def test_layer_none_and_include_1d_normalizations(tiny_bn_cnn, tiny_image_data):
    obj = Objective(tiny_bn_cnn, tiny_image_data)
    raw = raw_direction(obj.layout, 4, torch.float64)
    weights, raws = obj.layout.unflatten(obj.w0), obj.layout.unflatten(raw)
    layer = obj.layout.unflatten(normalize_direction(raw, obj.w0, obj.layout, "layer"))
    none = obj.layout.unflatten(normalize_direction(raw, obj.w0, obj.layout, "none"))
    with_1d = obj.layout.unflatten(
        normalize_direction(raw, obj.w0, obj.layout, "filter", include_1d=True)
    )
    for name, shape in zip(obj.layout.names, obj.layout.shapes, strict=True):
        # the whole tensor: ||d|| = ||w|| ||r|| / (||r|| + 1e-10), r the raw draw
        r, w_norm = raws[name].norm().item(), weights[name].norm().item()
        if len(shape) > 1:
            assert layer[name].norm().item() == pytest.approx(w_norm * r / (r + 1e-10), 1e-14)
            assert torch.equal(none[name], raws[name])
        else:  # include_1d: a 1-D tensor is one filter, rescaled as a whole
            assert with_1d[name].norm().item() == pytest.approx(w_norm * r / (r + 1e-10), 1e-14)
            if w_norm > 0:  # (a zero tensor, e.g. a fresh BN bias, gets a zero direction)
                assert cosine(with_1d[name], raws[name]) == pytest.approx(1.0, abs=1e-14)
    with pytest.raises(SharpscopeError, match="unknown normalization"):
        normalize_direction(raw, obj.w0, obj.layout, "batch")


def test_one_raw_draw_normalized_against_each_models_own_filters():
    """Comparing two minima fairly: the same Gaussian draw, each model's filter norms."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(torch.rand(p.shape, dtype=torch.float64) * 3)
    da, db = random_direction(a, seed=7), random_direction(b, seed=7)
    layout = parameter_layout(a)
    wa = layout.unflatten(layout.flatten({n: p.detach() for n, p in a.named_parameters()}))
    wb = layout.unflatten(layout.flatten({n: p.detach() for n, p in b.named_parameters()}))
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        if len(shape) > 1:  # row j of d_A / row j of d_B = ||w_A,j|| / ||w_B,j||, exactly
            ratio = layout.unflatten(da)[name] / layout.unflatten(db)[name]
            want = wa[name].norm(dim=1) / wb[name].norm(dim=1)
            torch.testing.assert_close(ratio, want[:, None].expand_as(ratio), rtol=1e-12, atol=0)


def test_d1_d2_are_two_draws_of_one_seed_and_reproducible(tiny_mlp):
    layout = parameter_layout(tiny_mlp)
    d1, d2 = raw_direction(layout, 5), raw_direction(layout, 5, index=1)
    assert torch.equal(d1, raw_direction(layout, 5)) and not torch.equal(d1, d2)
    assert not torch.equal(d1, raw_direction(layout, 6))
    assert abs(cosine(d1, d2)) < 0.5  # independent Gaussian draws of 38 entries


def test_orthogonalize_after_normalization():
    g = torch.Generator().manual_seed(0)
    d1, d2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g)
    o = orthogonalize(d1, d2.double())
    assert abs(cosine(o, d1)) < 1e-14
    assert o.norm().item() == pytest.approx(d2.norm().item(), rel=1e-6)


def test_interpolation_direction_and_different_architectures(tiny_mlp):
    other = copy.deepcopy(tiny_mlp)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    d = interpolation_direction(tiny_mlp, other)
    torch.testing.assert_close(d, torch.ones_like(d))
    wider = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with pytest.raises(SharpscopeError, match="different architectures"):
        interpolation_direction(tiny_mlp, wider)


def test_hessian_directions_are_the_dense_hessians_top_eigenvectors(tiny_mlp, tiny_data):
    obj = Objective(tiny_mlp, tiny_data)
    vectors, values = hessian_directions(obj, k=2)
    w = obj.w0.clone()
    dense = torch.autograd.functional.hessian(lambda v: _value(obj, v), w)
    evals, evecs = torch.linalg.eigh(dense)
    for i in range(2):
        assert values[i] == pytest.approx(evals[-1 - i].item(), rel=1e-6)
        assert abs(cosine(vectors[i], evecs[:, -1 - i])) == pytest.approx(1.0, abs=1e-5)


def _value(obj: Objective, w: torch.Tensor) -> torch.Tensor:
    (x, y) = next(obj.batches())
    with obj.at(w):
        return obj.loss_fn(obj.model(x), y)


def test_pca_recovers_a_planar_trajectory(tiny_mlp, tiny_data, tmp_path):
    """w_i = w + c_i1 u1 + c_i2 u2, u1 and u2 orthonormal, the columns of C orthogonal
    with ||c_1|| > ||c_2||: the top-2 principal components of [w_i - w] are u1 and u2
    (up to sign) and the coordinates C (Li et al. 2018, Sec. 7)."""
    obj = Objective(tiny_mlp, tiny_data)
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(obj.numel, 2, generator=g, dtype=torch.float64))
    u1, u2 = q[:, 0], q[:, 1]
    c = torch.tensor(
        [[3.0, 1.0], [2.0, -1.0], [1.0, -1.0], [0.0, 0.0], [-1.0, 0.0], [-2.0, 0.0]],
        dtype=torch.float64,
    )
    assert c[:, 0] @ c[:, 1] == 0
    os.makedirs(tmp_path / "trajectory")
    for i, (c1, c2) in enumerate(c):
        state = obj.layout.unflatten(obj.w0 + c1 * u1 + c2 * u2)
        save_checkpoint(tmp_path / "trajectory" / f"step_{10 * i:07d}.pt", {"state_dict": state})
    d1, d2, coords, explained = trajectory_directions(str(tmp_path), obj)
    # signed so that the first point's coordinates (3, 1) are >= 0: d1 = u1, d2 = u2
    assert cosine(d1, u1) == pytest.approx(1.0, abs=1e-12)
    assert cosine(d2, u2) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(coords, c.numpy(), atol=1e-12)
    assert explained == pytest.approx([19 / 22, 3 / 22], abs=1e-12)
    assert trajectory_checkpoints(str(tmp_path))[-1].endswith("step_0000050.pt")


@pytest.fixture(scope="module")
def run_with_trajectory(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("traj") / "run")
    config = TrainConfig(
        model="mlp",
        width=8,
        depth=1,
        epochs=2,
        train_subset=128,
        batch_size=32,
        save_every=2,
        device="cpu",
    )
    train(config, out, progress=False, quiet=True)
    return out


def test_pca_directions_are_the_top_principal_components(run_with_trajectory):
    from sharpscope.checkpoint import load_checkpoint, read_checkpoint

    model, meta = load_checkpoint(run_with_trajectory + "/checkpoint.pt")
    obj = Objective(model, load_dataset(meta["data"]).examples("train", 32))
    d1, d2, coords, explained = trajectory_directions(run_with_trajectory, obj)
    rows = []
    for path in sorted(__import__("glob").glob(run_with_trajectory + "/trajectory/step_*.pt")):
        sd = read_checkpoint(path)["state_dict"]
        rows.append(obj.layout.flatten(sd).double() - obj.w0.double())
    M = torch.stack(rows)
    cov_eigs = torch.linalg.eigvalsh(M.T @ M).flip(0)
    # d1 and d2 are unit, orthogonal, and capture the two largest variances of M.
    assert d1.norm().item() == pytest.approx(1, rel=1e-5) and abs(torch.dot(d1, d2)) < 1e-5
    assert (M @ d1.double()).pow(2).sum().item() == pytest.approx(cov_eigs[0].item(), rel=1e-4)
    assert (M @ d2.double()).pow(2).sum().item() == pytest.approx(cov_eigs[1].item(), rel=1e-4)
    assert coords.shape == (len(rows), 2) and np.allclose(coords[-1], 0, atol=1e-6)
    assert explained[0] >= explained[1] > 0
    surface = landscape_for_checkpoint(
        run_with_trajectory + "/checkpoint.pt",
        dim=2,
        points=5,
        range="auto",
        directions="pca",
        samples=32,
    )
    assert surface.trajectory.shape == (len(rows), 2)
    half = surface.settings["range"][1]
    assert half >= np.abs(coords).max()  # the plane holds the whole trajectory


def test_pca_needs_a_trajectory(tmp_path, tiny_mlp, tiny_data):
    with pytest.raises(SharpscopeError, match="--save-every"):
        trajectory_directions(str(tmp_path), Objective(tiny_mlp, tiny_data))


# -- grids and surfaces -----------------------------------------------------------------------
def test_grid_contains_zero_exactly():
    c = grid_coordinates(-1, 1, 51)
    assert c[25] == 0.0 and np.array_equal(c, -c[::-1])  # exactly symmetric
    np.testing.assert_allclose(np.diff(c), 0.04, rtol=1e-12)
    assert 0.0 in grid_coordinates(-0.3, 1, 40)
    assert 0.0 in grid_coordinates(-1, 1, 50)
    assert 0.0 not in grid_coordinates(0.5, 1, 5)
    assert list(grid_coordinates(-1, 1, 1)) == [0.0]
    with pytest.raises(SharpscopeError):
        grid_coordinates(-1, 1, 0)
    with pytest.raises(SharpscopeError):
        grid_coordinates(1, -1, 5)


def linear_mse_problem():
    """A float64 linear model under MSE: L(w + a d) is an exact parabola in a."""
    g = torch.Generator().manual_seed(4)
    model = nn.Linear(5, 3).double()
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randint(3, (40,), generator=g)
    return model, x, y


def test_1d_surface_of_a_linear_mse_model_is_its_closed_form():
    model, x, y = linear_mse_problem()
    obj = Objective(model, (x, y), mse, batch_size=16)
    d = random_direction(obj, seed=3, include_1d=True)
    coords = grid_coordinates(-2, 2, 9)
    s = surface_1d(obj, d, coords)
    # L(a) = 0.5 mean_i ||r_i + a s_i||^2 with r = f(x) - onehot(y), s = D x + d_b
    parts = obj.layout.unflatten(d)
    with torch.no_grad():
        r = model(x) - torch.nn.functional.one_hot(y, 3).double()
        sd = x @ parts["weight"].T + parts["bias"]
    want = [0.5 * ((r + a * sd) ** 2).sum(dim=1).mean().item() for a in coords]
    np.testing.assert_allclose(s.loss, want, rtol=1e-12)
    assert s.kind == "1d" and s.loss.shape == (9,)


def test_surface_points_are_w_plus_a_d1_plus_b_d2_rows_d2(tmp_path):
    path = tmp_path / "c.pt"
    model = save(path, width=4)
    s = landscape_for_checkpoint(
        str(path), dim=2, points=(5, 3), samples=32, seed=3, save_directions=True
    )
    assert s.loss.shape == (3, 5) and s.settings["layout"].startswith("rows = d2")
    obj = Objective(model, digits(32, seed=3))
    # the centre is L(w) itself, bit for bit
    assert (s.coords_a[2], s.coords_b[1]) == (0.0, 0.0)
    assert s.loss[1, 2] == obj.value()
    assert s.accuracy[1, 2] == obj.evaluate()["accuracy"]
    d1, d2 = torch.from_numpy(s.d1), torch.from_numpy(s.d2)
    for i, j in ((0, 4), (2, 0), (1, 3)):
        w = obj.w0 + float(s.coords_a[j]) * d1 + float(s.coords_b[i]) * d2
        assert s.loss[i, j] == obj.value(w)
    assert s.settings["cos_d1_d2"] == pytest.approx(cosine(d1, d2), abs=1e-7)
    assert s.settings["evaluation"] == "one point at a time"


def test_orthogonalized_2d_surface_reports_cos_zero(tmp_path):
    save(tmp_path / "c.pt", width=4)
    s = landscape_for_checkpoint(
        str(tmp_path / "c.pt"), dim=2, points=3, samples=16, orthogonalize=True
    )
    assert abs(s.settings["cos_d1_d2"]) < 1e-6 and s.settings["orthogonalize"] is True


def test_batched_and_one_by_one_evaluation_agree(tiny_bn_cnn, tiny_image_data):
    obj = Objective(tiny_bn_cnn, tiny_image_data, batch_size=7)
    g = torch.Generator().manual_seed(0)
    W = obj.w0 + 0.1 * torch.randn(5, obj.numel, generator=g, dtype=torch.float64)
    a = evaluate_points(obj, W, batched=True, chunk=2)
    b = evaluate_points(obj, W, batched=False)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-12)
    np.testing.assert_array_equal(a[1], b[1])
    d1, d2 = W[0] - obj.w0, W[1] - obj.w0
    coords = grid_coordinates(-1, 1, 5)
    vm = surface_2d(obj, d1, d2, coords, coords[:3], batched=True)
    one = surface_2d(obj, d1, d2, coords, coords[:3], batched=False)
    np.testing.assert_allclose(vm.loss, one.loss, rtol=1e-12)
    assert vm.settings["evaluation"].startswith("vmap")


def test_automatic_vmap_falls_back_for_a_model_it_cannot_take(tiny_data, monkeypatch):
    class Itemizing(nn.Module):  # .item() inside forward: vmap cannot batch it
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3).double()

        def forward(self, x):
            return self.linear(x) * (1.0 + 0.0 * self.linear.weight.sum().item())

    obj = Objective(Itemizing(), tiny_data)
    monkeypatch.setattr(ls, "_use_vmap", lambda objective, batched: batched is not False)
    d = random_direction(obj, seed=0)
    s = surface_1d(obj, d, grid_coordinates(-1, 1, 3))
    assert s.settings["evaluation"] == "one point at a time"
    assert s.loss[1] == obj.value()


def test_surface_reproduces_from_its_saved_seed(tmp_path):
    path = tmp_path / "c.pt"
    model = save(path, width=4)
    out = tmp_path / "s.npz"
    args = ["landscape", str(path), "--out", str(out), "--dim", "2", "--points", "5", "3"]
    assert main([*args, "--seed", "11", "--save-directions", *FAST]) == 0
    saved = load_surface(out)
    st = saved.settings
    assert saved.seed == 11 and st["seed"] == 11
    again = landscape_for_checkpoint(
        st["checkpoint"],
        dim=2,
        points=tuple(st["points"]),
        range=tuple(st["range"]),
        directions=st["directions"],
        seed=saved.seed,
        split=st["split"],
        samples=st["n_examples"],
    )
    np.testing.assert_array_equal(again.loss, saved.loss)
    np.testing.assert_array_equal(again.accuracy, saved.accuracy)
    assert again.settings["fingerprint"] == st["fingerprint"]
    np.testing.assert_array_equal(saved.d1, random_direction(model, seed=11).numpy())
    np.testing.assert_array_equal(saved.d2, random_direction(model, seed=11, index=1).numpy())


def test_auto_range_widens_until_the_edges_reach_ten_times_the_centre():
    model, x, y = linear_mse_problem()
    obj = Objective(model, (x, y), mse)
    d = random_direction(obj, seed=0)
    r = auto_range(obj, [d])
    centre = obj.value()
    edge = min(obj.value(obj.w0 + r * d), obj.value(obj.w0 - r * d))
    half = min(obj.value(obj.w0 + r / 2 * d), obj.value(obj.w0 - r / 2 * d))
    assert edge >= 10 * centre and (half < 10 * centre or r == AUTO_START)


# -- interpolation ----------------------------------------------------------------------------
def test_interpolation_endpoints_are_the_two_losses(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    ma, mb = save(a, width=4, seed=0), save(b, width=4, seed=1)
    s = interpolation_for_checkpoints(str(a), str(b), points=9, samples=32)
    data = digits(32)
    t = list(s.coords_a)
    assert s.loss[t.index(0.0)] == Objective(ma, data).value()
    assert s.loss[t.index(1.0)] == Objective(mb, data).value()
    assert s.settings["labels"] == ["a.pt", "b.pt"] and s.kind == "interpolation"
    # the default grid: 401 points on [-0.5, 1.5], t = 0 and t = 1 on it
    ts = grid_coordinates(-0.5, 1.5, INTERPOLATION_POINTS)
    assert ts[100] == 0.0 and abs(ts[300] - 1.0) < 1e-15


def test_interpolation_of_batchnorm_models_and_their_buffers(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    ma = save(a, width=4, seed=0, batchnorm=True)
    mb = save(b, width=4, seed=1, batchnorm=True)
    data = digits(32)
    with_buffers = interpolation_for_checkpoints(
        str(a), str(b), points=5, range=(0.0, 1.0), samples=32, include_buffers=True
    )
    plain = interpolation_for_checkpoints(str(a), str(b), points=5, range=(0.0, 1.0), samples=32)
    obj_b = Objective(mb, data)
    # states interpolated: t = 1 is model B, statistics and all
    assert with_buffers.loss[0] == Objective(ma, data).value()
    assert with_buffers.loss[-1] == obj_b.value()
    # weights only (the default): t = 1 is w_B with A's running statistics
    a_buffers = dict(ma.named_buffers())
    assert plain.loss[-1] == obj_b.evaluate(None, a_buffers)["loss"]
    assert plain.loss[-1] != obj_b.value()
    assert (plain.settings["bn"], with_buffers.settings["bn"]) == ("A", "interpolate")


def test_bn_recalibration_is_update_bn_on_a_copy(tiny_bn_cnn, tiny_image_data):
    before = snapshot(tiny_bn_cnn)
    obj = Objective(tiny_bn_cnn, tiny_image_data, batch_size=6)
    x, y = tiny_image_data
    batches = [(x[i : i + 5], y[i : i + 5]) for i in range(0, len(y), 5)]
    d = 0.3 * random_direction(obj, seed=2)
    w = obj.w0 + 1.0 * d  # as the surface computes its point a = 1
    got = BatchNormRecalibrator(obj, batches)(w)
    reference = copy.deepcopy(tiny_bn_cnn)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(obj.layout.unflatten(w)[name])
    torch.optim.swa_utils.update_bn(batches, reference)
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(got[name], buffer, rtol=1e-14, atol=1e-15)
    # a surface with bn_batches evaluates each point with those statistics
    s = surface_1d(obj, d, [0.0, 1.0], bn_batches=batches)
    assert s.loss[1] == obj.evaluate(w, got)["loss"]
    assert s.settings["evaluation"].endswith("BatchNorm recalibrated")
    assert_unchanged(tiny_bn_cnn, before)


def test_user_models_weights_buffers_and_modes_untouched(tiny_bn_cnn, tiny_image_data):
    before = snapshot(tiny_bn_cnn)
    other = copy.deepcopy(tiny_bn_cnn)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
        for b in other.buffers():
            b.add_(1)
    other_before = snapshot(other)
    obj = Objective(tiny_bn_cnn, tiny_image_data)
    evaluate_points(obj, obj.w0[None] + 1.0, batched=True)
    d = random_direction(obj, seed=1)
    surface_2d(obj, d, d.flip(0), [-1.0, 0.0, 1.0], [0.0, 2.0], bn_batches=[tiny_image_data])
    auto_range(obj, [d], max_doublings=2)
    for kw in ({"include_buffers": True}, {"bn_batches": [tiny_image_data]}, {}):
        interpolation(tiny_bn_cnn, other, tiny_image_data, [0.0, 0.5, 1.0], **kw)
    assert_unchanged(tiny_bn_cnn, before)
    assert_unchanged(other, other_before)


# -- resume -----------------------------------------------------------------------------------
def grid_problem(tiny_mlp, tiny_data):
    obj = Objective(tiny_mlp, tiny_data)
    g = torch.Generator().manual_seed(0)
    d1 = torch.randn(obj.numel, generator=g, dtype=torch.float64)
    d2 = torch.randn(obj.numel, generator=g, dtype=torch.float64)
    return obj, d1, d2, grid_coordinates(-1, 1, 9)


def counting(monkeypatch, stop_after=None):
    """Count the points evaluated; raise KeyboardInterrupt past ``stop_after``."""
    calls = {"n": 0}

    def wrapped(evaluator, weights, buffers=None):
        if stop_after is not None and calls["n"] + len(weights) > stop_after:
            raise KeyboardInterrupt
        calls["n"] += len(weights)
        return REAL_EVALUATE(evaluator, weights, buffers)

    monkeypatch.setattr(PointEvaluator, "__call__", wrapped)
    return calls


def test_interrupted_grid_resumes_without_recomputing(tiny_mlp, tiny_data, monkeypatch, tmp_path):
    obj, d1, d2, coords = grid_problem(tiny_mlp, tiny_data)
    full = surface_2d(obj, d1, d2, coords, coords)
    partial = str(tmp_path / "partial.npz")
    counting(monkeypatch, stop_after=30)
    with pytest.raises(KeyboardInterrupt):
        surface_2d(obj, d1, d2, coords, coords, resume_path=partial)
    saved = load_surface(partial)
    assert np.isfinite(saved.loss).sum() == 30 and np.isnan(saved.loss).sum() == 51
    calls = counting(monkeypatch)
    resumed = surface_2d(obj, d1, d2, coords, coords, resume_path=partial)
    assert calls["n"] == 81 - 30
    np.testing.assert_array_equal(resumed.loss, full.loss)
    np.testing.assert_array_equal(resumed.accuracy, full.accuracy)
    assert not os.path.exists(partial)  # complete: the partial file is gone


def test_a_killed_grid_resumes_from_its_last_periodic_save(
    tiny_mlp, tiny_data, monkeypatch, tmp_path
):
    """A kill (no exception handler runs) loses only the points since the last save."""
    obj, d1, d2, coords = grid_problem(tiny_mlp, tiny_data)
    full = surface_2d(obj, d1, d2, coords, coords)
    partial, killed = str(tmp_path / "partial.npz"), str(tmp_path / "killed.npz")
    monkeypatch.setattr(ls, "PARTIAL_SAVE_SECONDS", 0.0)
    real_save, saves = ls.save_partial, []

    def save_and_keep_the_first_copies(surface, done, path):
        real_save(surface, done, path)
        saves.append(int(done.sum()))
        if len(saves) <= 20:  # the file as a kill after the 20th periodic save leaves it
            _copy(path, killed)

    monkeypatch.setattr(ls, "save_partial", save_and_keep_the_first_copies)
    counting(monkeypatch, stop_after=50)
    with pytest.raises(KeyboardInterrupt):
        surface_2d(obj, d1, d2, coords, coords, resume_path=partial)
    assert saves[:20] == list(range(1, 21))
    calls = counting(monkeypatch)
    resumed = surface_2d(obj, d1, d2, coords, coords, resume_path=killed)
    assert calls["n"] == 81 - 20
    np.testing.assert_array_equal(resumed.loss, full.loss)


def _copy(src: str, dst: str) -> None:
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read())


def test_resume_refuses_a_partial_file_of_other_directions(
    tiny_mlp, tiny_data, monkeypatch, tmp_path
):
    obj, d1, d2, coords = grid_problem(tiny_mlp, tiny_data)
    partial = str(tmp_path / "partial.npz")
    counting(monkeypatch, stop_after=10)
    with pytest.raises(KeyboardInterrupt):
        surface_2d(obj, d1, d2, coords, coords, resume_path=partial)
    counting(monkeypatch)
    with pytest.raises(SharpscopeError, match="other settings"):
        surface_2d(obj, d1, -d2, coords, coords, resume_path=partial)


# -- file format ------------------------------------------------------------------------------
def test_surface_round_trip_keeps_everything(tmp_path):
    s = Surface(
        "2d",
        np.array([-1.0, 0.0, 1.0]),
        np.array([0.0, 0.5]),
        np.array([[1.0, np.nan, 2.0], [0.5, 0.25, np.inf]]),
        np.array([[0.5, np.nan, 0.4], [0.1, 0.2, 0.3]]),
        {"kind": "2d", "seed": 4, "label": "SAM → SGD", "range": [-1.0, 1.0]},
        trajectory=np.array([[0.1, 0.2], [0.0, 0.0]]),
        d1=np.arange(4.0),
        d2=np.ones(4, dtype=np.float32),
    )
    s.save(tmp_path / "n.npz")
    back = load_surface(tmp_path / "n.npz")
    for key in ("coords_a", "coords_b", "loss", "accuracy", "trajectory", "d1", "d2"):
        np.testing.assert_array_equal(getattr(back, key), getattr(s, key))
    assert back.settings == s.settings and back.seed == 4 and back.kind == "2d"
    with np.load(tmp_path / "n.npz", allow_pickle=False) as f:
        assert int(f["seed"]) == 4 and json.loads(str(f["settings"]))["label"] == "SAM → SGD"
    document = json.dumps(back.to_dict(), allow_nan=False)  # strict JSON: NaN -> null
    assert json.loads(document)["loss"][0][1] is None


def test_load_surface_rejects_foreign_files(tmp_path):
    (tmp_path / "text.npz").write_text("nope")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    settings = np.asarray(json.dumps({"kind": "1d"}))
    np.savez(
        tmp_path / "shape.npz",
        coords_a=np.arange(3.0),
        loss=np.zeros(4),
        accuracy=np.zeros(4),
        settings=settings,
    )
    for name in ("text.npz", "other.npz"):
        with pytest.raises(SharpscopeError, match="not a sharpscope landscape"):
            load_surface(tmp_path / name)
    with pytest.raises(SharpscopeError, match="does not match"):
        load_surface(tmp_path / "shape.npz")
    with pytest.raises(SharpscopeError, match="no such file"):
        load_surface(tmp_path / "missing.npz")


# -- command line -----------------------------------------------------------------------------
def test_cli_surfaces_and_interpolation(tmp_path, capsys):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    save(a, width=4)
    save(b, width=4, seed=1)
    out = tmp_path / "l.npz"
    assert main(["landscape", str(a), "--out", str(out), "--points", "5", *FAST]) == 0
    assert load_surface(out).loss.shape == (5,)
    interp = ["landscape", str(a), str(b), "--out", str(out), "--points", "9", *FAST]
    before = out.read_bytes()
    assert main(interp) == 2  # an existing surface is never replaced unasked
    assert "exists: pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main([*interp, "--overwrite"]) == 0
    s = load_surface(out)
    assert s.kind == "interpolation" and list(s.coords_a[[2, 6]]) == [0.0, 1.0]
    assert "wrote" in capsys.readouterr().out
    assert main(["landscape", str(a), "--out", str(a), "--overwrite", *FAST]) == 2
    assert "is an input of this command" in capsys.readouterr().err


def test_cli_pca_draws_the_trajectory_on_its_plane(tmp_path):
    run = tmp_path / "run"
    os.makedirs(run / "trajectory")
    final = save(run / "checkpoint.pt", width=4, seed=0)
    for i, scale in enumerate((1.3, 1.2, 1.1)):
        model = copy.deepcopy(final)
        with torch.no_grad():
            for k, p in enumerate(model.parameters()):
                p.mul_(scale + 0.05 * i * (k % 2))
        save_checkpoint(run / "trajectory" / f"step_{i:07d}.pt", {"state_dict": model.state_dict()})
    out = tmp_path / "pca.npz"
    args = ["landscape", str(run / "checkpoint.pt"), "--out", str(out), "--dim", "2"]
    assert main([*args, "--directions", "pca", "--points", "3", *FAST]) == 0
    s = load_surface(out)
    assert s.trajectory.shape == (3, 2) and s.settings["directions"] == "pca"
    assert s.settings["trajectory_steps"] == [0, 1, 2]
    half = s.settings["range"][1]
    assert half == pytest.approx(1.2 * np.abs(s.trajectory).max())
    assert abs(s.settings["cos_d1_d2"]) < 1e-6


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--points", "0"], "positive"),
        (["--points", "3", "3", "3"], "one number, or NX NY"),
        (["--range", "1", "-1"], "need finite LOW < HIGH"),
        (["--range", "a", "b"], "not numbers"),
        (["--points", "3", "4"], "NX NY with dim 2"),
        (["--include-buffers"], "two checkpoints"),
        (["--trajectory", "run"], "directions 'pca' only"),
        (["--orthogonalize"], "2-D landscapes"),
        (["--samples", "0"], "positive"),
        (["--draws", "0"], "--draws must be in 1.."),
        (["--draws", "2", "--directions", "hessian"], "random directions"),
    ],
)
def test_cli_refuses_bad_options(tmp_path, capsys, extra, message):
    save(tmp_path / "c.pt", width=4)
    out = tmp_path / "l.npz"
    assert main(["landscape", str(tmp_path / "c.pt"), "--out", str(out), *FAST, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_cli_refuses_bad_files(tmp_path, capsys):
    c = tmp_path / "c.pt"
    save(c, width=4)
    save(tmp_path / "mlp.pt", name="mlp", width=4)
    (tmp_path / "junk.pt").write_bytes(b"\x00 not a checkpoint")
    out = str(tmp_path / "l.npz")
    cases = [
        ([str(c), "--out", str(tmp_path / "no" / "l.npz")], "does not exist"),
        ([str(c), "--out", str(tmp_path / "l.txt")], "must end in .npz"),
        ([str(tmp_path / "missing.pt"), "--out", out], "no such file"),
        ([str(tmp_path / "junk.pt"), "--out", out], "not a readable checkpoint"),
        ([str(c), str(tmp_path / "mlp.pt"), "--out", out], "different architectures"),
        ([str(c), str(c), "--out", out, "--dim", "2"], "not for an interpolation"),
        ([str(c), str(c), str(c), "--out", out], "one checkpoint"),
    ]
    for argv, message in cases:
        assert main(["landscape", *argv, *FAST]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    assert not os.path.exists(out)


def test_cli_interrupt_keeps_a_partial_file_and_resume_finishes_it(tmp_path, monkeypatch, capsys):
    c = tmp_path / "c.pt"
    save(c, width=4)
    argv = ["landscape", str(c), "--dim", "2", "--points", "5", *FAST]
    full, out = tmp_path / "full.npz", tmp_path / "l.npz"
    assert main([*argv, "--out", str(full)]) == 0
    counting(monkeypatch, stop_after=12)
    assert main([*argv, "--out", str(out)]) == 130
    partial = tmp_path / "l.partial.npz"
    assert partial.exists() and not out.exists() and "--resume" in capsys.readouterr().err
    assert main([*argv, "--out", str(out)]) == 2  # refuses to overwrite unfinished work
    assert "unfinished" in capsys.readouterr().err
    calls = counting(monkeypatch)
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    assert calls["n"] == 25 - 12 and not partial.exists()
    np.testing.assert_array_equal(load_surface(out).loss, load_surface(full).loss)


def test_summarize_draws_of_known_surfaces():
    """Three 2-D surfaces whose rises are known: each draw's mean and max rise, their mean
    and standard error over the draws; surfaces of other kinds or grids are refused."""
    a = np.array([-1.0, 0.0, 1.0])
    cone = np.abs(a)[None, :] + np.abs(a)[:, None]  # centre 0, mean over the box 1, max 2
    surfaces = [Surface("2d", a, a, 1.0 + k * cone, cone, {}) for k in (1, 2, 3)]
    result = summarize_draws(surfaces)
    assert result["kind"] == "2d" and result["draws"] == 3
    assert result["mean_rise"]["values"] == pytest.approx([1.0, 2.0, 3.0])
    assert result["max_rise"]["values"] == pytest.approx([2.0, 4.0, 6.0])
    assert result["max_rise"]["mean"] == pytest.approx(4.0)
    assert result["max_rise"]["stderr"] == pytest.approx(2.0 / np.sqrt(3))
    assert summarize_draws(surfaces[:1])["mean_rise"]["stderr"] is None  # one draw: no spread
    curve = Surface("1d", a, None, a**2, a, {})
    wide = Surface("2d", np.linspace(-1, 1, 5), a, np.zeros((3, 5)), np.zeros((3, 5)), {})
    for bad in ([], [surfaces[0], curve], [surfaces[0], wide]):
        with pytest.raises(SharpscopeError):
            summarize_draws(bad)


def test_cli_draws_write_one_surface_per_draw_and_their_spread(tmp_path, monkeypatch, capsys):
    """--draws 3: OUT is draw 0 (the picture), OUT.draw1/2.npz the others, each the API's
    surface of that draw; the printed spread is that of the files. An interrupted draw
    resumes without recomputing the finished ones; a file of other settings is refused
    and kept."""
    c = tmp_path / "c.pt"
    save(c, width=4)
    argv = ["landscape", str(c), "--dim", "2", "--points", "3", "--draws", "3", *FAST]
    out = tmp_path / "l.npz"
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    paths = [out, tmp_path / "l.draw1.npz", tmp_path / "l.draw2.npz"]
    surfaces = [load_surface(p) for p in paths]
    for k, surface in enumerate(surfaces):
        expected = landscape_for_checkpoint(str(c), dim=2, points=3, samples=32, draw=k)
        assert surface.settings["draw"] == k
        np.testing.assert_array_equal(surface.loss, expected.loss)
    assert not np.array_equal(surfaces[0].loss, surfaces[1].loss)
    spread = summarize_draws(surfaces)
    assert f"mean loss rise {spread['mean_rise']['mean']:.4g} ± " in printed
    assert f"max loss rise {spread['max_rise']['mean']:.4g} ± " in printed
    # Interrupted in draw 2 (21 of 27 points done: 3 of draw 2's 9), then resumed: the
    # 6 points left are computed, none of the finished draws 0 and 1.
    again = tmp_path / "again.npz"
    counting(monkeypatch, stop_after=21)
    assert main([*argv, "--out", str(again)]) == 130
    capsys.readouterr()
    calls = counting(monkeypatch)
    assert main([*argv, "--out", str(again), "--resume"]) == 0
    assert calls["n"] == 9 - 3
    assert load_surface(tmp_path / "again.draw2.npz").loss.tolist() == surfaces[2].loss.tolist()
    # --resume over files of another landscape: refused, nothing replaced.
    before = out.read_bytes()
    assert main([*argv, "--out", str(out), "--resume", "--seed", "1"]) == 2
    assert "holds another landscape" in capsys.readouterr().err
    assert out.read_bytes() == before and not (tmp_path / "l.partial.npz").exists()


@pytest.mark.slow
def test_cli_grid_stopped_by_sigkill_or_sigterm_resumes_to_the_same_numbers(tmp_path):
    c = tmp_path / "c.pt"
    save(c, width=4)
    # 101 x 101 points on 512 examples: well over the first periodic save (10 s)
    argv = [sys.executable, "-m", "sharpscope", "landscape", str(c), "--dim", "2"]
    argv += ["--points", "101", "--samples", "512", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([*argv, "--out", str(tmp_path / "full.npz")], check=True, env=env)
    out, partial = str(tmp_path / "l.npz"), tmp_path / "l.partial.npz"

    def finished() -> int:
        return int(np.isfinite(load_surface(partial).loss).sum())

    # SIGKILL: no handler runs; what the last periodic save wrote is what is left
    proc = subprocess.Popen([*argv, "--out", out], env=env)
    deadline = time.monotonic() + 120
    while not partial.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = finished()
    assert 0 < first < 101 * 101
    # SIGTERM: turned into KeyboardInterrupt, the finished points are saved at once
    proc = subprocess.Popen(
        [*argv, "--out", out, "--resume"], env=env, stderr=subprocess.PIPE, text=True
    )
    time.sleep(8)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 130 and "--resume" in proc.stderr.read()
    assert first < finished() < 101 * 101
    subprocess.run([*argv, "--out", out, "--resume"], check=True, env=env)
    np.testing.assert_array_equal(load_surface(out).loss, load_surface(tmp_path / "full.npz").loss)
    assert not partial.exists()
