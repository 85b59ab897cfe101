"""Landscape directions beyond random ones: PCA of a trajectory, Hessian eigenvectors,
BatchNorm recalibration and the automatic range."""

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.directions import random_direction, trajectory_directions
from sharpscope.errors import SharpscopeError
from sharpscope.grid import BatchNormRecalibrator, auto_range
from sharpscope.hessian import hessian_eigenvalues
from sharpscope.landscape import landscape_for_checkpoint
from sharpscope.objective import Objective
from sharpscope.train import TrainConfig, train


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
    from sharpscope.data import load_dataset

    model, meta = load_checkpoint(run_with_trajectory + "/checkpoint.pt")
    obj = Objective(model, load_dataset(meta["data"]).examples("train", 32))
    d1, d2, coords, explained = trajectory_directions(run_with_trajectory, obj)
    import glob

    rows = []
    for path in sorted(glob.glob(run_with_trajectory + "/trajectory/step_*.pt")):
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


def test_hessian_directions_are_the_top_eigenvectors(run_with_trajectory):
    surface = landscape_for_checkpoint(
        run_with_trajectory + "/checkpoint.pt",
        dim=1,
        points=5,
        directions="hessian",
        samples=32,
        save_directions=True,
    )
    from sharpscope.checkpoint import load_checkpoint
    from sharpscope.data import load_dataset

    model, meta = load_checkpoint(run_with_trajectory + "/checkpoint.pt")
    obj = Objective(model, load_dataset(meta["data"]).examples("train", 32, seed=0))
    d = torch.as_tensor(surface.d1)
    lam = hessian_eigenvalues(obj, k=1).eigenvalues[0]
    assert surface.settings["hessian_eigenvalues"][0] == pytest.approx(lam, rel=1e-4)
    assert torch.linalg.vector_norm(obj.hvp(d) - lam * d).item() <= 1e-3 * abs(lam)


def test_bn_recalibration_matches_update_bn_and_leaves_the_model(tiny_bn_cnn, tiny_image_data):
    obj = Objective(tiny_bn_cnn, tiny_image_data)
    before = {k: v.clone() for k, v in tiny_bn_cnn.state_dict().items()}
    w = obj.w0 + 0.1 * random_direction(obj, seed=1)
    x, y = tiny_image_data
    batches = [(x[:9], y[:9]), (x[9:], y[9:])]
    buffers = BatchNormRecalibrator(obj, batches)(w)
    reference = __import__("copy").deepcopy(tiny_bn_cnn)
    torch.nn.utils.vector_to_parameters(w, reference.parameters())
    torch.optim.swa_utils.update_bn([xb for xb, _ in batches], reference)
    for name, value in reference.named_buffers():
        torch.testing.assert_close(buffers[name], value, rtol=1e-12, atol=1e-12)
    for k, v in tiny_bn_cnn.state_dict().items():
        assert torch.equal(v, before[k])


def test_auto_range_reaches_the_loss_multiple(tiny_mlp, tiny_data):
    obj = Objective(tiny_mlp, tiny_data)
    d = random_direction(obj, seed=0)
    r = auto_range(obj, [d], factor=2.0)
    centre = obj.value()
    edges = [obj.value(obj.w0 + s * r * d) for s in (-1, 1)]
    assert min(edges) >= 2.0 * centre
    if r > 0.5:  # the previous (half) width had not reached it
        assert min(obj.value(obj.w0 + s * r / 2 * d) for s in (-1, 1)) < 2.0 * centre


def test_layer_normalization_gives_each_tensor_the_weight_norm(tiny_mlp, tiny_data):
    obj = Objective(tiny_mlp, tiny_data)
    d = random_direction(obj, seed=0, normalization="layer")
    for name, part in obj.layout.unflatten(d).items():
        w = obj.layout.unflatten(obj.w0)[name]
        if w.dim() > 1:
            assert part.norm().item() == pytest.approx(w.norm().item(), rel=1e-8)
    assert isinstance(tiny_mlp, nn.Module)
