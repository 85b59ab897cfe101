"""Figures over seeds from saved files: every plotted number read back from the Figure and
compared with the mean and standard error of the inputs; the 2/η line where it belongs;
bad input refused in one line, by the API and by `sharpscope plot`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics

import numpy as np
import pytest

from sharpscope import figures
from sharpscope.cli import main
from sharpscope.errors import SharpscopeError
from sharpscope.files import write_json, write_jsonl
from sharpscope.train import train
from sharpscope.train_config import TrainConfig, learning_rate, resolve_config
from tests.cli_utils import exit2

TINY = {"data": "synthetic", "train_subset": 64, "model": "mlp", "width": 8, "depth": 1}


def mean_se(values) -> tuple[float, float | None]:
    values = [float(v) for v in values]
    if len(values) == 1:
        return values[0], None
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


# -- inputs made by hand -------------------------------------------------------------------
def document(
    *,
    checkpoint: str = "ckpt.pt",
    sharpness: dict[float, float] | None = None,
    eigenvalues: list[float] | None = None,
    density: tuple[np.ndarray, np.ndarray] | None = None,
    steps: int = 20,
    norm: str = "l2",
) -> dict:
    """A measure document (the fields sharpscope measure writes) with the given numbers."""
    common = {"seed": 0, "n_examples": 256, "n_params": 100, "param_filter": "all"}
    hessian: dict = {"split": "train"}
    if eigenvalues is not None:
        hessian["eigenvalues"] = list(eigenvalues)
        hessian["eigenvalue_settings"] = {
            "eigenvalues": list(eigenvalues),
            "k": len(eigenvalues),
            "method": "lanczos",
            **common,
        }
    if density is not None:
        grid, values = density
        hessian["density"] = {
            "grid": list(map(float, grid)),
            "density": list(map(float, values)),
            "runs": 5,
            "steps": 80,
            "sigma": 0.1,
            **common,
        }
    entries = [
        {
            "split": "train",
            "value": value,
            "rho": rho,
            "norm": norm,
            "adaptive": False,
            "eta": 0.0,
            "steps": steps,
            "restarts": 1,
            "m": None,
            **common,
        }
        for rho, value in (sharpness or {}).items()
    ]
    return {
        "checkpoint": checkpoint,
        "split": "train",
        "n_examples": 256,
        "sharpness": entries,
        "hessian": hessian,
    }


RHOS = (0.01, 0.05, 0.1)
SGD_SHARPNESS = [(0.02, 0.3, 0.9), (0.03, 0.5, 1.1), (0.01, 0.4, 1.6)]  # 3 seeds x 3 rhos
SAM_SHARPNESS = [(0.01, 0.1, 0.3), (0.02, 0.2, 0.2)]


def sharpness_groups() -> dict[str, list[dict]]:
    return {
        "SGD": [
            document(checkpoint=f"sgd{i}.pt", sharpness=dict(zip(RHOS, v, strict=True)))
            for i, v in enumerate(SGD_SHARPNESS)
        ],
        "SAM": [
            document(checkpoint=f"sam{i}.pt", sharpness=dict(zip(RHOS, v, strict=True)))
            for i, v in enumerate(SAM_SHARPNESS)
        ],
    }


def errorbar_data(container) -> tuple[np.ndarray, np.ndarray, list | None]:
    """(x, y, [(low, high)] or None) of an errorbar container."""
    x, y = (np.asarray(v, dtype=float) for v in container.lines[0].get_data())
    if not container.has_yerr:
        return x, y, None
    bars = [(seg[0][1], seg[1][1]) for seg in container.lines[2][0].get_segments()]
    for seg, xi in zip(container.lines[2][0].get_segments(), x, strict=True):
        assert seg[0][0] == seg[1][0] == xi  # vertical bars at the data's x
    return x, y, bars


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


# -- 3. sharpness against rho ----------------------------------------------------------------
def test_sharpness_against_rho_plots_group_means_with_standard_errors(tmp_path):
    out = tmp_path / "rho.pdf"
    fig = figures.plot_sharpness_rho(sharpness_groups(), out)
    assert out.read_bytes().startswith(b"%PDF")
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"  # rho spans a decade
    assert "worst-case sharpness" in ax.get_ylabel()
    for words in ("l2", "20 APGD steps", "train", "256 examples"):
        assert words in ax.get_ylabel()
    assert ax.get_xlabel().startswith("ρ") and "l2" in ax.get_xlabel()
    assert legend_texts(ax) == ["SGD (n=3)", "SAM (n=2)"]
    for container, runs in zip(ax.containers, (SGD_SHARPNESS, SAM_SHARPNESS), strict=True):
        x, y, bars = errorbar_data(container)
        np.testing.assert_array_equal(x, RHOS)
        for j in range(len(RHOS)):
            mean, se = mean_se([r[j] for r in runs])
            assert y[j] == pytest.approx(mean, rel=1e-12)
            assert bars[j] == pytest.approx((mean - se, mean + se), rel=1e-12)


def test_a_group_of_one_has_no_bar_and_says_n1(tmp_path):
    groups = {"SAM": [document(sharpness={0.05: 0.25})]}
    fig = figures.plot_sharpness_rho(groups, tmp_path / "one.png")
    (ax,) = fig.axes
    x, y, bars = errorbar_data(ax.containers[0])
    assert list(x) == [0.05] and list(y) == [0.25] and bars is None
    assert legend_texts(ax) == ["SAM (n=1)"]
    assert ax.get_xscale() == "linear"  # one rho: no decade to span


def test_sharpness_figure_refuses_bad_documents(tmp_path):
    out = tmp_path / "f.png"
    with pytest.raises(SharpscopeError, match="no groups"):
        figures.plot_sharpness_rho({}, out)
    with pytest.raises(SharpscopeError, match="group 'SGD' is empty"):
        figures.plot_sharpness_rho({"SGD": []}, out)
    with pytest.raises(SharpscopeError, match="no worst-case sharpness.*--rho"):
        figures.plot_sharpness_rho({"SGD": [document()]}, out)
    mixed = [document(sharpness={0.05: 1.0}), document(sharpness={0.05: 1.0, 0.1: 2.0})]
    with pytest.raises(
        SharpscopeError, match="group SGD: its documents were measured at different"
    ):
        figures.plot_sharpness_rho({"SGD": mixed}, out)
    other_norm = {"SGD": [document(sharpness={0.05: 1.0}, norm="linf")]}
    with pytest.raises(SharpscopeError, match="different norm"):
        figures.plot_sharpness_rho({**sharpness_groups(), **other_norm}, out)
    bad = document(sharpness={0.05: 1.0})
    bad["sharpness"][0]["value"] = None  # json_safe's NaN
    with pytest.raises(SharpscopeError, match="ckpt.pt: sharpness at ρ = 0.05 is None"):
        figures.plot_sharpness_rho({"SGD": [bad]}, out)
    with pytest.raises(SharpscopeError, match="unknown figure format"):
        figures.plot_sharpness_rho(sharpness_groups(), tmp_path / "f.jpg")
    assert not out.exists()


# -- 4. top-k eigenvalues ----------------------------------------------------------------------
SGD_EIGS = [[40.0, 20.0, 10.0, 8.0, 5.0], [50.0, 22.0, 12.0, 7.0, 4.0]]
SAM_EIGS = [[10.0, 8.0, 6.0, 5.0, 4.0], [12.0, 9.0, 7.0, 5.5, 4.5], [11.0, 9.5, 6.0, 5.0, 5.0]]


def test_top_k_eigenvalues_with_bars_and_the_ratio_in_the_legend(tmp_path):
    groups = {
        "SGD": [document(eigenvalues=e) for e in SGD_EIGS],
        "SAM": [document(eigenvalues=e) for e in SAM_EIGS],
    }
    out = tmp_path / "eigs.svg"
    fig = figures.plot_eigenvalues(groups, out)
    assert out.read_text().lstrip().startswith("<?xml")
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"  # every eigenvalue positive
    assert "Hessian eigenvalue" in ax.get_ylabel() and "256 examples" in ax.get_ylabel()
    assert "index" in ax.get_xlabel()
    texts = legend_texts(ax)
    for container, rows, text, label in zip(
        ax.containers, (SGD_EIGS, SAM_EIGS), texts, ("SGD", "SAM"), strict=True
    ):
        x, y, bars = errorbar_data(container)
        np.testing.assert_array_equal(x, [1, 2, 3, 4, 5])
        for j in range(5):
            mean, se = mean_se([r[j] for r in rows])
            assert y[j] == pytest.approx(mean, rel=1e-12)
            assert bars[j] == pytest.approx((mean - se, mean + se), rel=1e-12)
        ratio, ratio_se = mean_se([r[0] / r[4] for r in rows])
        assert text == f"{label} (n={len(rows)}), λ1/λ5 = {ratio:.4g} ± {ratio_se:.2g}"


def test_eigenvalues_below_k5_have_no_ratio_and_nonpositive_ones_a_linear_axis(tmp_path):
    groups = {"SGD": [document(eigenvalues=[3.0, -1.0])]}
    fig = figures.plot_eigenvalues(groups, tmp_path / "e.png")
    (ax,) = fig.axes
    assert legend_texts(ax) == ["SGD (n=1)"]
    assert ax.get_yscale() == "linear"


def test_eigenvalue_figure_refuses_mismatched_k_and_missing_eigenvalues(tmp_path):
    out = tmp_path / "e.png"
    groups = {"SGD": [document(eigenvalues=SGD_EIGS[0])], "SAM": [document(eigenvalues=[1.0])]}
    with pytest.raises(SharpscopeError, match="mismatched k: 5 eigenvalues in group SGD"):
        figures.plot_eigenvalues(groups, out)
    with pytest.raises(SharpscopeError, match="no Hessian eigenvalues.*--eigs"):
        figures.plot_eigenvalues({"SGD": [document()]}, out)
    with pytest.raises(SharpscopeError, match="a measure document"):
        figures.plot_eigenvalues({"SGD": ["not a document"]}, out)
    assert not out.exists()


# -- 2. the spectral density ----------------------------------------------------------------
def bump(grid: np.ndarray, center: float, width: float) -> np.ndarray:
    return np.exp(-((grid - center) ** 2) / (2 * width**2)) / (width * math.sqrt(2 * math.pi))


def test_density_is_the_group_mean_on_a_log_axis_with_a_floor(tmp_path):
    grid = np.linspace(-1.0, 10.0, 200)
    sgd = [bump(grid, 0.0, 0.2) + 0.01 * bump(grid, c, 0.3) for c in (7.0, 8.0)]
    sam = [bump(grid, 0.0, 0.2) + 0.01 * bump(grid, c, 0.3) for c in (3.0, 3.5, 4.0)]
    groups = {
        "SGD": [document(density=(grid, d)) for d in sgd],
        "SAM": [document(density=(grid, d)) for d in sam],
    }
    fig = figures.plot_density(groups, tmp_path / "density.png")
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    assert "density" in ax.get_ylabel() and "SLQ" in ax.get_ylabel()
    assert "5 runs × 80 Lanczos steps" in ax.get_ylabel()
    assert "eigenvalue" in ax.get_xlabel() and "256 examples" in ax.get_xlabel()
    assert legend_texts(ax) == ["SGD (n=2)", "SAM (n=3)"]
    means = [np.mean(sgd, axis=0), np.mean(sam, axis=0)]
    floor = figures.DENSITY_FLOOR * max(m.max() for m in means)
    assert (means[0] < floor).any()  # the floor is used: exp(-...) underflows far away
    for line, mean in zip(ax.lines, means, strict=True):
        x, y = line.get_data()
        np.testing.assert_array_equal(x, grid)  # one shared grid: used as it is
        np.testing.assert_allclose(y, np.maximum(mean, floor), rtol=1e-12)
    assert ax.get_ylim()[0] == pytest.approx(floor)
    # The band: mean ± standard error at every grid point, floored.
    band = ax.collections[0].get_paths()[0].vertices
    j = int(np.argmax(means[0]))
    _, se = mean_se([d[j] for d in sgd])
    assert np.isclose(band[:, 1], means[0][j] + se, rtol=1e-9).any()
    assert np.isclose(band[:, 1], means[0][j] - se, rtol=1e-9).any()


def test_densities_on_different_grids_are_interpolated_onto_one(tmp_path):
    a_grid, b_grid = np.linspace(0.0, 4.0, 41), np.linspace(2.0, 8.0, 61)
    a, b = bump(a_grid, 2.0, 0.5), bump(b_grid, 5.0, 0.5)
    groups = {"SGD": [document(density=(a_grid, a)), document(density=(b_grid, b))]}
    fig = figures.plot_density(groups, tmp_path / "d.png", log=False)
    (ax,) = fig.axes
    x, y = ax.lines[0].get_data()
    np.testing.assert_allclose(x, np.linspace(0.0, 8.0, 61))
    expected = (np.interp(x, a_grid, a, left=0, right=0) + np.interp(x, b_grid, b, 0, 0)) / 2
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    assert ax.get_yscale() == "linear"


def test_density_figure_refuses_documents_without_a_density(tmp_path):
    with pytest.raises(SharpscopeError, match="no Hessian density.*--density --json"):
        figures.plot_density({"SGD": [document(eigenvalues=[1.0])]}, tmp_path / "d.png")
    grid = np.linspace(0, 1, 5)
    short = document(density=(grid, np.ones(5)))
    short["hessian"]["density"]["density"] = [1.0, 2.0]
    with pytest.raises(SharpscopeError, match="2 values on 5 grid points"):
        figures.plot_density({"SGD": [short]}, tmp_path / "d.png")


# -- 1. the top eigenvalue over training ----------------------------------------------------
def fake_run(folder, tracks: dict[int, float], *, sharpness=None, epochs=None, **config) -> str:
    """A run folder as sharpscope train writes it, with the given tracking records."""
    os.makedirs(folder)
    c = resolve_config(TrainConfig(**{**TINY, "optimizer": "sgd", **config}))
    write_json(os.path.join(folder, "config.json"), dataclasses.asdict(c))
    records = []
    for step, top in tracks.items():
        record = {"kind": "track", "step": step, "hessian_top": top}
        if sharpness is not None:
            record.update(sharpness=sharpness[step], sharpness_rho=c.rho)
        records.append({**record, "track_samples": 32})
    for epoch, step in (epochs or {}).items():
        records.append({"kind": "epoch", "epoch": epoch, "step": step, "lr": c.lr})
    write_jsonl(os.path.join(folder, "metrics.jsonl"), records)
    return str(folder)


def test_training_curve_is_the_mean_with_a_band_and_the_2_over_lr_line(tmp_path):
    constant = {"schedule": "constant", "momentum": 0.0, "lr": 0.1, "steps": 40}
    sgd = [
        fake_run(tmp_path / "sgd0", {0: 1.0, 10: 5.0, 20: 15.0, 30: 19.0}, **constant),
        fake_run(tmp_path / "sgd1", {0: 2.0, 10: 7.0, 20: 18.0, 30: 21.0, 40: 20.0}, **constant),
    ]
    sam = [fake_run(tmp_path / "sam0", {0: 1.5, 10: 3.0, 20: 4.0}, **constant)]
    fig = figures.plot_training({"SGD": sgd, "SAM": sam}, tmp_path / "eos.pdf")
    assert (tmp_path / "eos.pdf").read_bytes().startswith(b"%PDF")
    (ax,) = fig.axes  # no sharpness tracked: one panel
    assert ax.get_xlabel() == "step"
    assert "top Hessian eigenvalue" in ax.get_ylabel() and "32 examples" in ax.get_ylabel()
    sgd_line, sam_line, threshold = ax.lines
    x, y = sgd_line.get_data()
    np.testing.assert_array_equal(x, [0, 10, 20, 30])  # the steps both runs tracked
    np.testing.assert_allclose(y, [1.5, 6.0, 16.5, 20.0])
    assert sgd_line.get_label() == "SGD (n=2)" and sam_line.get_label() == "SAM (n=1)"
    np.testing.assert_allclose(sam_line.get_data()[1], [1.5, 3.0, 4.0])
    # One dashed line at 2/lr exactly, shared by the groups (same lr).
    assert list(threshold.get_ydata()) == [2 / 0.1, 2 / 0.1]
    assert threshold.get_linestyle() == "--"
    assert threshold.get_label() == "2/η (η = 0.1)"
    assert "2/η (η = 0.1)" in legend_texts(ax)
    assert ax.get_ylim()[1] >= 20.0
    # The SGD band: mean ± standard error at each common step; none for SAM (n=1).
    assert len(ax.collections) == 1
    band = ax.collections[0].get_paths()[0].vertices
    for step, values in ((10, (5.0, 7.0)), (20, (15.0, 18.0))):
        mean, se = mean_se(values)
        at = band[band[:, 0] == step][:, 1]
        assert min(at) == pytest.approx(mean - se) and max(at) == pytest.approx(mean + se)


def test_threshold_follows_the_schedule_and_the_momentum(tmp_path):
    cosine = fake_run(
        tmp_path / "cos",
        {0: 1.0, 5: 2.0, 10: 3.0},
        schedule="cosine",
        lr=0.2,
        momentum=0.0,
        steps=20,
    )
    fig = figures.plot_training({"SGD": [cosine]}, tmp_path / "c.png")
    (ax,) = fig.axes
    line = ax.lines[-1]
    x, y = line.get_data()
    np.testing.assert_array_equal(x, np.arange(0, 11))
    c = figures.read_run(cosine).config
    np.testing.assert_allclose(y, [2 / learning_rate(c, s, 20) for s in range(11)], rtol=1e-12)
    assert line.get_linestyle() == "--" and line.get_label() == "2/η (η: 0.2, cosine)"

    heavy = fake_run(tmp_path / "hb", {0: 1.0, 4: 2.0}, schedule="constant", lr=0.1, momentum=0.9)
    nesterov = fake_run(
        tmp_path / "nag", {0: 1.0, 4: 2.0}, schedule="constant", lr=0.1, momentum=0.9, nesterov=True
    )
    fig = figures.plot_training({"HB": [heavy], "NAG": [nesterov]}, tmp_path / "m.png")
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.lines}
    hb = lines["(2+2β)/η, β = 0.9, HB (η = 0.1)"]  # one line per group: they differ
    nag = lines["(2+2β)/((1+2β)η), β = 0.9, NAG (η = 0.1)"]
    assert hb.get_ydata()[0] == pytest.approx(3.8 / 0.1, rel=1e-12)
    assert nag.get_ydata()[0] == pytest.approx(3.8 / (2.8 * 0.1), rel=1e-12)


def test_training_in_epochs_and_with_a_sharpness_panel(tmp_path):
    tracks = {0: 1.0, 4: 2.0, 8: 3.0}
    runs = [
        fake_run(
            tmp_path / f"r{i}",
            tracks,
            sharpness={0: 0.1 * (i + 1), 4: 0.2 * (i + 1), 8: 0.3 * (i + 1)},
            epochs={1: 4, 2: 8},
            schedule="constant",
            momentum=0.0,
        )
        for i in range(2)
    ]
    fig = figures.plot_training({"SAM": runs}, tmp_path / "t.png", x="epoch")
    top, sharp = fig.axes
    assert sharp.get_xlabel() == "epoch"
    assert "sharpness" in sharp.get_ylabel() and "ρ = 0.05" in sharp.get_ylabel()
    x, y = sharp.lines[0].get_data()
    np.testing.assert_array_equal(x, [0.0, 1.0, 2.0])  # 4 steps per epoch
    np.testing.assert_allclose(y, [0.15, 0.3, 0.45])
    fig = figures.plot_training({"SAM": runs}, tmp_path / "t.png", sharpness=False)
    assert len(fig.axes) == 1


def test_training_figure_refuses_runs_without_tracking(tmp_path):
    out = tmp_path / "t.png"
    untracked = fake_run(tmp_path / "plain", {})
    with pytest.raises(SharpscopeError, match=f"run {untracked} has no --track-every records"):
        figures.plot_training({"SGD": [untracked]}, out)
    with pytest.raises(SharpscopeError, match="no metrics.jsonl: not a sharpscope run folder"):
        figures.plot_training({"SGD": [tmp_path]}, out)
    a = fake_run(tmp_path / "a", {0: 1.0, 10: 2.0}, schedule="constant")
    b = fake_run(tmp_path / "b", {5: 1.0, 15: 2.0}, schedule="constant")
    with pytest.raises(SharpscopeError, match="share no tracked step"):
        figures.plot_training({"SGD": [a, b]}, out)
    c = fake_run(tmp_path / "c", {0: 1.0, 10: 2.0}, schedule="constant", lr=0.05)
    with pytest.raises(SharpscopeError, match="differ in learning rate"):
        figures.plot_training({"SGD": [a, c]}, out)
    with pytest.raises(SharpscopeError, match="no tracked sharpness.*--track-sharpness"):
        figures.plot_training({"SGD": [a]}, out, sharpness=True)
    with pytest.raises(SharpscopeError, match="no finished epoch"):
        figures.plot_training({"SGD": [a]}, out, x="epoch")
    assert not out.exists()


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """Three tiny real runs tracked every 2 steps: SGD seeds 0 and 1, SAM seed 0."""
    root = tmp_path_factory.mktemp("runs")
    common = {
        **TINY,
        "batch_size": 16,
        "epochs": 1,
        "schedule": "constant",
        "momentum": 0.0,
        "lr": 0.1,
        "track_every": 2,
        "track_samples": 32,
        "track_sharpness": True,
    }
    runs = {}
    for name, optimizer, seed in (("sgd-0", "sgd", 0), ("sgd-1", "sgd", 1), ("sam-0", "sam", 0)):
        train(TrainConfig(**common, optimizer=optimizer, seed=seed), root / name, quiet=True)
        runs[name] = root / name
    return runs


def test_training_figure_of_real_runs(real_runs, tmp_path):
    groups = {"SGD": [real_runs["sgd-0"], real_runs["sgd-1"]], "SAM": [real_runs["sam-0"]]}
    fig = figures.plot_training(groups, tmp_path / "eos.png")
    top, sharp = fig.axes  # both runs tracked sharpness
    records = {}
    for name, path in real_runs.items():
        with open(path / "metrics.jsonl") as f:
            records[name] = [r for r in map(json.loads, f) if r["kind"] == "track"]
    steps = [r["step"] for r in records["sgd-0"]]
    assert steps == [0, 2, 4]
    x, y = top.lines[0].get_data()
    np.testing.assert_array_equal(x, steps)
    expected = [
        statistics.fmean([records[n][i]["hessian_top"] for n in ("sgd-0", "sgd-1")])
        for i in range(3)
    ]
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    np.testing.assert_allclose(
        sharp.lines[1].get_ydata(), [r["sharpness"] for r in records["sam-0"]]
    )
    assert list(top.lines[-1].get_ydata()) == [2 / 0.1, 2 / 0.1]  # the 2/lr line, exactly
    fig = figures.plot_training(groups, tmp_path / "eos.png", x="epoch", log=True)
    np.testing.assert_array_equal(fig.axes[0].lines[0].get_xdata(), [0.0, 0.5, 1.0])  # 4/epoch
    assert fig.axes[0].get_yscale() == "log"


# -- the command line ---------------------------------------------------------------------------
def write_documents(path, documents: list[dict]) -> str:
    """A file as sharpscope measure --json writes it."""
    labels = [d["checkpoint"] for d in documents]
    write_json(path, {"command": "measure", "labels": labels, "results": documents})
    return str(path)


def test_cli_draws_every_kind(real_runs, tmp_path, capsys):
    grid = np.linspace(0, 5, 50)
    sgd, sam = sharpness_groups()["SGD"], sharpness_groups()["SAM"]
    for i, doc in enumerate(sgd + sam):
        doc["hessian"] = document(eigenvalues=SGD_EIGS[i % 2], density=(grid, bump(grid, i, 1)))[
            "hessian"
        ]
    a = write_documents(tmp_path / "sgd.json", sgd[:2])  # two seeds in one file
    b = write_documents(tmp_path / "sgd2.json", sgd[2:])
    c = write_documents(tmp_path / "sam.json", sam)
    groups = ["--group", "SGD", a, b, "--group", "SAM", c]
    for kind in ("rho", "eigenvalues", "density"):
        out = tmp_path / f"{kind}.png"
        assert main(["plot", "--kind", kind, *groups, "--out", str(out)]) == 0
        assert out.stat().st_size > 10_000
        assert capsys.readouterr().out.strip() == f"wrote {out}"
    training = ["--group", "SGD", str(real_runs["sgd-0"]), str(real_runs["sgd-1"])]
    training += ["--group", "SAM", str(real_runs["sam-0"])]
    out = tmp_path / "training.pdf"
    assert main(["plot", "--kind", "training", *training, "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"%PDF")
    argv = ["plot", "--kind", "training", *training, "--x-axis", "epoch", "--no-sharpness"]
    assert main([*argv, "--out", str(out)]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--out", str(out), "--overwrite", "--columns", "2"]) == 0


def test_cli_reads_real_measure_files(real_runs, tmp_path, capsys):
    ckpts = [str(real_runs[n] / "checkpoint.pt") for n in ("sgd-0", "sgd-1")]
    measure = ["--samples", "32", "--steps", "2", "--no-trace", "--eigs", "2", "--quiet"]
    measured = tmp_path / "sgd.json"
    argv = ["measure", *ckpts, *measure, "--rho", "0.01", "0.1", "--density"]
    assert main([*argv, "--json", str(measured)]) == 0
    capsys.readouterr()
    documents = figures.read_measure_file(measured)
    assert len(documents) == 2  # one per checkpoint: two seeds
    for kind in ("rho", "eigenvalues", "density"):
        out = tmp_path / f"{kind}.png"
        argv = ["plot", "--kind", kind, "--group", "SGD", str(measured), "--out", str(out)]
        assert main(argv) == 0
        assert out.exists()
    fig = figures.plot_sharpness_rho({"SGD": documents}, tmp_path / "r.png")
    x, y, bars = errorbar_data(fig.axes[0].containers[0])
    values = [[d["sharpness"][j]["value"] for d in documents] for j in range(2)]
    np.testing.assert_allclose(y, [statistics.fmean(v) for v in values], rtol=1e-12)
    assert "2 APGD steps" in fig.axes[0].get_ylabel()


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-group", "needs --group LABEL PATH"),
        ("positional", "not positional files"),
        ("label-only", "--group SGD names no input"),
        ("twice", "--group SGD is given twice"),
        ("same-file", "names one file twice"),
        ("surface-option", "--style applies to --kind surface only"),
        ("training-option", "--x-axis applies to --kind training only"),
        ("no-density", "no Hessian density"),
        ("mismatched-k", "mismatched k"),
        ("not-json", "not a sharpscope measure JSON file"),
        ("not-measure", "no measure results in it"),
        ("missing", "no such file"),
        ("untracked", "has no --track-every records"),
        ("not-a-run", "not a sharpscope run folder"),
        ("input", "is an input of this command"),
        ("extension", "unknown figure format"),
    ],
)
def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys, case, message):
    a = write_documents(tmp_path / "a.json", [document(eigenvalues=[3.0, 2.0], checkpoint="a")])
    b = write_documents(tmp_path / "b.json", [document(eigenvalues=[3.0], checkpoint="b")])
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"command": "landscape"}')
    run = fake_run(tmp_path / "run", {})
    out, kind, groups, extra = str(tmp_path / "f.png"), "eigenvalues", ["--group", "SGD", a], []
    if case == "no-group":
        groups = []
    elif case == "positional":
        kind = f"eigenvalues {a}"  # before the options: a positional file
    elif case == "label-only":
        groups = ["--group", "SGD"]
    elif case == "twice":
        groups += ["--group", "SGD", b]
    elif case == "same-file":
        groups += ["--group", "SAM", str(tmp_path / "." / "a.json")]
    elif case == "surface-option":
        extra = ["--style", "heatmap"]
    elif case == "training-option":
        extra = ["--x-axis", "epoch"]
    elif case == "no-density":
        kind = "density"
    elif case == "mismatched-k":
        groups += ["--group", "SAM", b]
    elif case == "not-json":
        groups = ["--group", "SGD", str(tmp_path / "junk.json")]
    elif case == "not-measure":
        groups = ["--group", "SGD", str(tmp_path / "other.json")]
    elif case == "missing":
        groups = ["--group", "SGD", str(tmp_path / "nothing.json")]
    elif case in ("untracked", "not-a-run"):
        kind = "training"
        groups = ["--group", "SGD", run if case == "untracked" else str(tmp_path)]
    elif case == "input":
        out = a
        extra = ["--overwrite"]
    elif case == "extension":
        out = str(tmp_path / "f.jpg")
    before = sorted(os.listdir(tmp_path))
    a_bytes = open(a, "rb").read()
    err = exit2(["plot", "--kind", *kind.split(), *groups, *extra, "--out", out], capsys)
    assert message in err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temp file left
    assert open(a, "rb").read() == a_bytes
