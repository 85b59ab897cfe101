import numpy as np
import pytest
import torch

from sharpscope.checkpoint import save_checkpoint
from sharpscope.cli import main
from sharpscope.data import data_spec
from sharpscope.errors import SharpscopeError
from sharpscope.landscape import (
    Surface,
    evaluate_points,
    grid_coordinates,
    interpolation_for_checkpoints,
    landscape_for_checkpoint,
    load_surface,
    normalize_direction,
    orthogonalize,
    raw_direction,
    surface_2d,
)
from sharpscope.models import build_model, model_spec
from sharpscope.objective import Objective

FAST = ["--samples", "32", "--quiet"]


def save(path, name="cnn", seed=0, **options):
    torch.manual_seed(seed)
    spec = model_spec(name, (1, 8, 8), 10, **options)
    model = build_model(spec)
    save_checkpoint(
        path,
        {
            "model": spec,
            "data": data_spec("digits"),
            "config": {},
            "metrics": {},
            "state_dict": model.state_dict(),
        },
    )
    return model


def test_filter_normalization_gives_each_filter_the_norm_of_ws(tiny_bn_cnn, tiny_image_data):
    obj = Objective(tiny_bn_cnn, tiny_image_data)
    d = normalize_direction(raw_direction(obj.layout, 0, obj.w0.dtype), obj.w0, obj.layout)
    parts, weights = obj.layout.unflatten(d), obj.layout.unflatten(obj.w0)
    for name, shape in zip(obj.layout.names, obj.layout.shapes, strict=True):
        if len(shape) > 1:
            got = parts[name].reshape(shape[0], -1).norm(dim=1)
            want = weights[name].reshape(shape[0], -1).norm(dim=1)
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)
        else:  # biases and BN affine parameters stay put by default
            assert torch.count_nonzero(parts[name]) == 0
    with_1d = normalize_direction(
        raw_direction(obj.layout, 0, obj.w0.dtype), obj.w0, obj.layout, include_1d=True
    )
    bias = obj.layout.unflatten(with_1d)["0.bias"]
    assert bias.norm().item() == pytest.approx(weights["0.bias"].norm().item(), rel=1e-8)


def test_same_seed_same_raw_direction_for_two_models(tiny_bn_cnn, tiny_image_data):
    obj = Objective(tiny_bn_cnn, tiny_image_data)
    assert torch.equal(raw_direction(obj.layout, 5), raw_direction(obj.layout, 5))
    assert not torch.equal(raw_direction(obj.layout, 5), raw_direction(obj.layout, 6))


def test_orthogonalize_after_normalization():
    g = torch.Generator().manual_seed(0)
    d1, d2 = torch.randn(50, generator=g), torch.randn(50, generator=g)
    o = orthogonalize(d1, d2)
    assert abs(torch.dot(o, d1).item()) < 1e-5 and o.norm().item() == pytest.approx(
        d2.norm().item()
    )


def test_grid_contains_zero_exactly():
    assert 0.0 in grid_coordinates(-1, 1, 51)
    assert 0.0 in grid_coordinates(-0.3, 1, 40)
    assert 0.0 not in grid_coordinates(0.5, 1, 5)
    with pytest.raises(SharpscopeError):
        grid_coordinates(-1, 1, 0)


def test_batched_and_one_by_one_evaluation_agree(tiny_bn_cnn, tiny_image_data):
    obj = Objective(tiny_bn_cnn, tiny_image_data, batch_size=7)
    g = torch.Generator().manual_seed(0)
    W = obj.w0 + 0.1 * torch.randn(5, obj.numel, generator=g, dtype=torch.float64)
    a = evaluate_points(obj, W, batched=True, chunk=2)
    b = evaluate_points(obj, W, batched=False)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-12)
    np.testing.assert_array_equal(a[1], b[1])


def test_2d_centre_is_the_loss_at_w_and_surface_reproduces(tmp_path):
    path = tmp_path / "c.pt"
    model = save(path, width=4)
    kw = {"dim": 2, "points": (5, 3), "samples": 32, "seed": 3}
    s = landscape_for_checkpoint(str(path), **kw)
    assert s.loss.shape == (3, 5) and s.settings["layout"].startswith("rows = d2")
    from sharpscope.data import load_dataset

    x, y = load_dataset("digits").examples("train", 32, seed=3)
    centre = Objective(model, (x, y)).value()
    # the grid holds a = b = 0 exactly; vmap and plain kernels agree to float32 rounding
    assert s.loss[1, 2] == pytest.approx(centre, rel=1e-6)
    again = landscape_for_checkpoint(str(path), **kw)
    np.testing.assert_array_equal(s.loss, again.loss)
    s.save(str(tmp_path / "s.npz"))
    loaded = load_surface(str(tmp_path / "s.npz"))
    np.testing.assert_array_equal(loaded.loss, s.loss)
    assert loaded.settings["seed"] == 3 and loaded.kind == "2d"


def test_interpolation_endpoints_are_the_two_losses(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    ma, mb = save(a, width=4, seed=0), save(b, width=4, seed=1)
    s = interpolation_for_checkpoints(str(a), str(b), points=9, samples=32)
    from sharpscope.data import load_dataset

    data = load_dataset("digits").examples("train", 32, seed=0)
    t = list(s.coords_a)
    assert s.loss[t.index(0.0)] == pytest.approx(Objective(ma, data).value(), rel=1e-6)
    assert s.loss[t.index(1.0)] == pytest.approx(Objective(mb, data).value(), rel=1e-6)
    save(tmp_path / "other.pt", name="mlp", width=4)
    with pytest.raises(SharpscopeError, match="different architectures"):
        interpolation_for_checkpoints(str(a), str(tmp_path / "other.pt"))


def test_interrupted_grid_resumes_without_recomputing(tiny_mlp, tiny_data, monkeypatch, tmp_path):
    obj = Objective(tiny_mlp, tiny_data)
    g = torch.Generator().manual_seed(0)
    d1 = torch.randn(obj.numel, generator=g, dtype=torch.float64)
    d2 = torch.randn(obj.numel, generator=g, dtype=torch.float64)
    coords = grid_coordinates(-1, 1, 9)
    full = surface_2d(obj, d1, d2, coords, coords, batched=False)

    import sharpscope.landscape as ls

    calls = {"n": 0}
    real = ls.evaluate_points

    def flaky(objective, weights, **kw):
        calls["n"] += len(weights)
        if calls["n"] > 64:  # the second chunk of 64 is interrupted
            raise KeyboardInterrupt
        return real(objective, weights, **kw)

    partial = str(tmp_path / "partial.npz")
    monkeypatch.setattr(ls, "evaluate_points", flaky)
    with pytest.raises(KeyboardInterrupt):
        surface_2d(obj, d1, d2, coords, coords, batched=False, resume_path=partial)
    saved = load_surface(partial)
    done = np.isfinite(saved.loss).sum()
    assert 0 < done < 81 and np.isnan(saved.loss).sum() == 81 - done
    counted = {"n": 0}

    def counting(objective, weights, **kw):
        counted["n"] += len(weights)
        return real(objective, weights, **kw)

    monkeypatch.setattr(ls, "evaluate_points", counting)
    resumed = surface_2d(obj, d1, d2, coords, coords, batched=False, resume_path=partial)
    assert counted["n"] == 81 - done
    np.testing.assert_array_equal(resumed.loss, full.loss)


def test_user_model_untouched(tmp_path, tiny_bn_cnn, tiny_image_data):
    before = {k: v.clone() for k, v in tiny_bn_cnn.state_dict().items()}
    obj = Objective(tiny_bn_cnn, tiny_image_data)
    evaluate_points(obj, obj.w0[None] + 1.0, batched=True)
    for k, v in tiny_bn_cnn.state_dict().items():
        assert torch.equal(v, before[k])


def test_cli_writes_npz_and_refuses_bad_input(tmp_path, capsys):
    path = tmp_path / "c.pt"
    save(path, width=4)
    out = tmp_path / "l.npz"
    assert main(["landscape", str(path), "--out", str(out), "--points", "5", *FAST]) == 0
    assert load_surface(str(out)).loss.shape == (5,)
    assert main(["landscape", str(path), "--out", str(tmp_path / "no" / "l.npz"), *FAST]) == 2
    assert main(["landscape", str(path), "--out", str(out), "--points", "0", *FAST]) == 2
    assert main(["landscape", str(tmp_path / "missing.pt"), "--out", str(out), *FAST]) == 2
    (tmp_path / "bad.npz").write_text("nope")
    with pytest.raises(SharpscopeError, match="not a sharpscope landscape"):
        load_surface(str(tmp_path / "bad.npz"))
    err = capsys.readouterr().err
    assert err.count("\n") == 3


def test_surface_round_trip_keeps_nan(tmp_path):
    s = Surface(
        "1d",
        np.array([-1.0, 0.0, 1.0]),
        None,
        np.array([1.0, np.nan, 2.0]),
        np.array([0.5, np.nan, 0.4]),
        {"kind": "1d", "seed": 0},
    )
    s.save(str(tmp_path / "n.npz"))
    assert np.isnan(load_surface(str(tmp_path / "n.npz")).loss[1])
