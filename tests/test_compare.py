"""``compare`` and ``demo``: every file written, numbers consistent across analyses."""

from __future__ import annotations

import json
import math
import os

import matplotlib.image
import numpy as np
import pytest
import torch

from sharpscope import compare, report
from sharpscope.checkpoint import save_checkpoint
from sharpscope.cli import main
from sharpscope.data import data_spec, load_dataset
from sharpscope.errors import SharpscopeError
from sharpscope.models import build_model, model_spec
from sharpscope.surface import Surface
from tests.cli_utils import exit2


def tiny_checkpoint(path, seed: int, width: int = 3) -> str:
    """A 2-layer CNN for digits with seeded random weights, saved as a checkpoint."""
    ds = load_dataset("digits")
    spec = model_spec("cnn", ds.input_shape, ds.num_classes, width=width, depth=2)
    model = build_model(spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    payload = {"model": spec, "data": data_spec("digits"), "config": {}, "metrics": {}}
    save_checkpoint(path, {**payload, "state_dict": model.state_dict()})
    return str(path)


@pytest.fixture
def checkpoints(tmp_path):
    return tiny_checkpoint(tmp_path / "a.pt", 0), tiny_checkpoint(tmp_path / "b.pt", 1)


SMALL = {"points": 5, "points_2d": 5, "samples": 64, "trace_samples": 4}


def test_compare_writes_report_json_surfaces_and_figures(checkpoints, tmp_path):
    out = tmp_path / "cmp"
    doc = compare.compare_checkpoints(*checkpoints, str(out), labels=("SGD", "SAM"), **SMALL)
    files = set(os.listdir(out))
    surfaces = {"interpolation.npz", "1d_a.npz", "1d_b.npz", "2d_a.npz", "2d_b.npz"}
    figures = {f"{n}.{e}" for n in ("interpolation", "1d", "2d_contour", "2d_surface3d")
               for e in ("pdf", "png")}  # fmt: skip
    assert files == surfaces | figures | {"report.md", "results.json"}
    for name in figures:
        if name.endswith(".pdf"):
            assert (out / name).read_bytes().startswith(b"%PDF")
        else:
            assert matplotlib.image.imread(out / name)[..., :3].std() > 0.05
    text = (out / "report.md").read_text()
    for png in sorted(n for n in figures if n.endswith(".png")):
        assert f"]({png})" in text  # every PNG embedded
    assert "sharpness l2 rho=0.05" in text and "Hessian eigenvalue 1" in text
    saved = json.loads((out / "results.json").read_text())
    assert saved["labels"] == ["SGD", "SAM"] == doc["labels"]
    assert saved["settings"]["samples"] == 64 and saved["settings"]["seed"] == 0


def test_report_plot_commands_remake_the_figures_exactly(checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    compare.compare_checkpoints(*checkpoints, str(out), labels=("SGD", "SAM"), **SMALL)
    commands = [
        line.split()[1:]
        for line in (out / "report.md").read_text().splitlines()
        if line.startswith("sharpscope plot ")
    ]
    assert len(commands) == 4
    monkeypatch.chdir(out)
    (tmp_path / "again").mkdir()
    for argv in commands:
        name = os.path.splitext(argv[argv.index("--out") + 1])[0]
        argv[argv.index("--out") + 1] = str(tmp_path / "again" / f"{name}.png")
        assert main(argv) == 0
        assert (tmp_path / "again" / f"{name}.png").read_bytes() == (
            out / f"{name}.png"
        ).read_bytes()


def test_compare_numbers_agree_across_analyses(checkpoints, tmp_path):
    """The same examples everywhere: L(w_A) from measure = interpolation at t = 0 = the
    centre of the 1-D and 2-D surfaces; L(w_B) = interpolation at t = 1."""
    doc = compare.compare_checkpoints(*checkpoints, str(tmp_path / "c"), **SMALL)
    interp = doc["interpolation"]
    t = np.asarray(interp["coords"])
    for k, model in enumerate("ab"):
        measured = doc["measure"][k]["loss"]["train"]
        at_end = interp["loss"][int(np.flatnonzero(t == float(k))[0])]
        assert at_end == pytest.approx(measured, rel=1e-5)
        assert doc["1d"][k]["summary"]["centre_loss"] == pytest.approx(measured, rel=1e-5)
        assert doc["2d"][k]["summary"]["centre_loss"] == pytest.approx(measured, rel=1e-5)
        assert doc["2d"][k]["file"] == f"2d_{model}.npz"
    # The same seed for both: the same raw directions, each normalized to its own model.
    assert doc["1d"][0]["settings"]["seed"] == doc["1d"][1]["settings"]["seed"]
    assert doc["color_scale"]["levels"][0] <= min(np.nanmin(doc["2d"][k]["loss"]) for k in range(2))


def test_interpolation_barrier_of_a_known_curve():
    """L(t) = chord + 0.5 sin(pi t)^2 on [0, 1]: barrier 0.5 at t = 1/2, whatever lies
    outside [0, 1] (Frankle et al. 2020's definition)."""
    t = np.linspace(-0.5, 1.5, 41)
    loss = (1 - t) * 0.2 + t * 0.6 + 0.5 * np.sin(np.pi * t) ** 2
    loss[t < 0] = 100.0  # outside [0, 1]: ignored
    barrier = compare.interpolation_barrier(Surface("interpolation", t, None, loss, loss, {}))
    assert barrier["value"] == pytest.approx(0.5)
    assert barrier["t"] == pytest.approx(0.5)
    convex = Surface("interpolation", t, None, (t - 0.5) ** 2, t, {})
    assert compare.interpolation_barrier(convex)["value"] == 0.0


def test_landscape_summary_of_a_known_surface():
    """L = 1 + |a| + 2|b| on [-1, 1]^2: the trapezoidal rule is exact for it on a grid
    holding the kinks, so the mean over the box is its integral average 1 + 1/2 + 1 on a
    coarse grid and a fine one alike; the maximum 4 is at the corners."""
    for n in (3, 5, 21):
        a = np.linspace(-1, 1, n)
        loss = 1.0 + np.abs(a)[None, :] + 2 * np.abs(a)[:, None]
        summary = compare.landscape_summary(Surface("2d", a, a, loss, loss, {}))
        assert summary["centre_loss"] == 1.0
        assert summary["mean_loss"] == pytest.approx(2.5, rel=1e-12)
        assert summary["mean_rise"] == pytest.approx(1.5, rel=1e-12)
        assert summary["max_loss"] == 4.0 and summary["max_rise"] == 3.0
    curve = compare.landscape_summary(Surface("1d", a, None, np.abs(a), a, {}))
    assert curve["mean_rise"] == pytest.approx(0.5, rel=1e-12) and curve["max_rise"] == 1.0
    # An unfinished point (NaN) is left out of the mean and the maximum.
    loss[0, 0] = np.nan
    weights = np.outer(*(2 * [np.r_[0.5, np.ones(19), 0.5]]))
    finite = np.isfinite(loss)
    expected = (weights[finite] * loss[finite]).sum() / weights[finite].sum()
    summary = compare.landscape_summary(Surface("2d", a, a, loss, loss, {}))
    assert summary["mean_loss"] == pytest.approx(expected, rel=1e-12)
    assert summary["max_loss"] == 4.0


def test_results_json_is_standard_json():
    from sharpscope.files import json_safe

    cleaned = json_safe({"a": [1.0, math.nan], "b": {"c": math.inf}, "d": "x"})
    assert cleaned == {"a": [1.0, None], "b": {"c": None}, "d": "x"}


def test_compare_refuses_bad_input(checkpoints, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SharpscopeError, match="a file is in the way"):
        compare.compare_checkpoints(*checkpoints, str(tmp_path / "file" / "out"), **SMALL)
    with pytest.raises(SharpscopeError, match="no such file"):
        compare.compare_checkpoints(checkpoints[0], str(tmp_path / "x.pt"), str(tmp_path / "o"))
    other = tiny_checkpoint(tmp_path / "wide.pt", 2, width=5)
    with pytest.raises(SharpscopeError, match="different architectures"):
        compare.compare_checkpoints(checkpoints[0], other, str(tmp_path / "o"), **SMALL)


def test_compare_never_leaves_a_half_written_folder(checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my own report")
    with pytest.raises(SharpscopeError, match="not empty: pass --overwrite"):
        compare.compare_checkpoints(*checkpoints, str(out), **SMALL)
    with pytest.raises(SharpscopeError, match="at least 2 probes"):  # before any work
        bad = {**SMALL, "trace_samples": 0}
        compare.compare_checkpoints(*checkpoints, str(tmp_path / "new"), **bad)
    assert not (tmp_path / "new").exists()

    def broken(*args, **kwargs):
        raise RuntimeError("failed half way")

    monkeypatch.setattr(report, "plot_2d", broken)  # after the surfaces are computed
    for folder, overwrite in ((tmp_path / "fresh", False), (out, True)):
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(RuntimeError, match="half way"):
            compare.compare_checkpoints(*checkpoints, str(folder), overwrite=overwrite, **SMALL)
        assert sorted(os.listdir(tmp_path)) == before  # no new folder left behind
    assert os.listdir(out) == ["report.md"] and (out / "report.md").read_text() == "my own report"
    monkeypatch.undo()
    compare.compare_checkpoints(*checkpoints, str(out), overwrite=True, **SMALL)
    assert "my own report" not in (out / "report.md").read_text()  # asked for: replaced
    assert not [n for n in os.listdir(out) if n.startswith(".compare-")]  # no staging left


@pytest.mark.parametrize("names", [("interpolation.npz", "1d_b.npz"), ("a.pt", "report.md")])
def test_compare_never_writes_over_its_inputs_by_any_path(checkpoints, tmp_path, capsys, names):
    out = tmp_path / "out"
    out.mkdir()
    inputs = []
    for source, name in zip(checkpoints, names, strict=True):
        target = out / name  # a checkpoint named like one of compare's outputs
        target.write_bytes(open(source, "rb").read())
        inputs.append(target)
    link = tmp_path / "link.pt"  # and one reached through a link
    os.symlink(inputs[1], link)
    before = {p: p.read_bytes() for p in inputs}
    for a, b in ((inputs[0], inputs[1]), (inputs[0], link)):
        argv = ["compare", str(a), str(b), "--out", str(out), "--overwrite", "--quick"]
        assert main([*argv, "--no-measure", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "is where compare writes" in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in inputs} == before
    assert sorted(os.listdir(out)) == sorted(names)


def test_compare_refuses_a_folder_of_other_files_before_touching_any(checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    (out / ".compare-mine").mkdir(parents=True)
    (out / ".compare-mine" / "data.txt").write_text("mine")
    (out / ".tmp-other").write_text("mine too")
    stale = out / ".compare-abcd1234"  # a killed compare's staging folder: ours
    stale.mkdir()
    (stale / "1d_a.npz").write_bytes(b"half")
    argv = ["compare", *checkpoints, "--out", str(out), "--quick", "--no-measure", "--quiet"]
    assert "not empty" in exit2(argv, capsys)
    assert (out / ".compare-mine" / "data.txt").read_text() == "mine"
    assert (out / ".tmp-other").read_text() == "mine too" and stale.exists()
    (out / ".compare-mine" / "data.txt").unlink()
    (out / ".compare-mine").rmdir()
    (out / ".tmp-other").unlink()
    assert main(argv) == 0  # only the killed compare's leftovers: not in the way
    assert not stale.exists()


def test_compare_takes_one_process_at_a_time(checkpoints, tmp_path):
    from sharpscope.files import LOCK_NAME, exclusive_lock

    out = tmp_path / "out"
    out.mkdir()
    with exclusive_lock(str(out / LOCK_NAME), "another compare"):
        with pytest.raises(SharpscopeError, match="in use by another sharpscope process"):
            compare.compare_checkpoints(*checkpoints, str(out), **SMALL)
    assert os.listdir(out) == []


def test_compare_command_exit_codes(checkpoints, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    blocked = ["compare", *checkpoints, "--out", str(tmp_path / "file" / "out"), "--quick"]
    assert main(blocked) == 2
    err = capsys.readouterr().err
    assert "a file is in the way" in err and "Traceback" not in err
    assert main(["compare", checkpoints[0], str(tmp_path / "x.pt"), "--out", "o"]) == 2
    assert "no such file" in capsys.readouterr().err
    out = tmp_path / "new" / "ok"  # parents are created
    argv = ["compare", *checkpoints, "--out", str(out), "--labels", "A", "B", "--quiet"]
    argv += ["--points", "3", "--points-2d", "3", "--samples", "32", "--trace-samples", "2"]
    assert main(argv) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["points_2d"] == 3
    assert saved["2d"][0]["settings"]["points"] == [3, 3]


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """Short trainings over two seeds and a quick compare of the two groups; every output
    of the demo is there, and the statistics hold the trainings' own test accuracies."""
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--quick", "--epochs", "2", "--seeds", "2", "--quiet"]
    assert main(argv) == 0
    runs = {f"{optimizer}-{s}" for optimizer in ("sgd", "sam") for s in (0, 1)}
    for run in runs:
        assert (out / run / "checkpoint.pt").is_file()
    saved = json.loads((out / "compare" / "results.json").read_text())
    assert saved["labels"] == ["SGD", "SAM"] and set(saved["training"]) == runs
    assert saved["settings"]["draws"] == 3
    accuracy = saved["statistics"]["final test accuracy (whole test set)"]
    sam = [saved["training"][f"sam-{s}"]["metrics"]["test_accuracy"] for s in (0, 1)]
    assert accuracy["values_b"] == sam
    assert (out / "compare" / "2d_contour.png").is_file()
    assert "## Statistics over seeds" in (out / "compare" / "report.md").read_text()


def test_final_test_accuracy_is_a_row_only_where_it_adds_a_number(tmp_path):
    """The training's accuracy on the whole test set joins the statistics unless the
    measurement already covered the whole test set (the same number: one row, one test)."""
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"x")
    training = {"sgd-0": {"checkpoint": str(path), "metrics": {"test_accuracy": 0.9}}}
    row = {"final test accuracy (whole test set)": 0.9}
    assert compare._training_numbers(str(path), training, measured=0.8) == row
    assert compare._training_numbers(str(path), training, measured=0.9) == {}
    assert compare._training_numbers(str(tmp_path / "other.pt"), training, 0.8) == {}


def test_demo_refuses_to_train_over_an_earlier_demo(tmp_path, capsys):
    (tmp_path / "demo" / "sam-1").mkdir(parents=True)
    (tmp_path / "demo" / "sam-1" / "checkpoint.pt").write_bytes(b"earlier run")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quick"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert not (tmp_path / "demo" / "sgd-0").exists()  # failed before training anything


# -- groups of runs ---------------------------------------------------------------------------


def test_groups_report_every_number_with_its_spread_and_the_difference(tmp_path):
    """Two checkpoints a side: every number is the group's mean ± s.e. of the same number
    measured on each checkpoint alone, the difference is Welch's test of those values, and
    the 1-D rise averages the direction draws of each checkpoint."""
    from sharpscope.landscape import landscape_for_checkpoint
    from sharpscope.measure import measure_checkpoint
    from sharpscope.stats import welch

    a = [tiny_checkpoint(tmp_path / f"a{i}.pt", i) for i in range(2)]
    b = [tiny_checkpoint(tmp_path / f"b{i}.pt", 10 + i, width=3) for i in range(2)]
    out = tmp_path / "groups"
    settings = {**SMALL, "draws": 2, "draw_points_2d": 3}
    doc = compare.compare_checkpoints(a, b, str(out), labels=("SGD", "SAM"), **settings)
    assert doc["groups"] == {"a": a, "b": b}
    stats = doc["statistics"]
    single = measure_checkpoint(b[1], samples=64, trace_samples=4)
    assert doc["numbers"]["b"][1]["top eigenvalue"] == pytest.approx(
        single["hessian"]["eigenvalues"][0], rel=1e-9
    )
    row = stats["top eigenvalue"]
    values_a = [n["top eigenvalue"] for n in doc["numbers"]["a"]]
    values_b = [n["top eigenvalue"] for n in doc["numbers"]["b"]]
    assert row["a"]["mean"] == pytest.approx(np.mean(values_a), rel=1e-12)
    assert row["a"]["stderr"] == pytest.approx(np.std(values_a, ddof=1) / math.sqrt(2), rel=1e-9)
    assert row["difference"]["p"] == pytest.approx(welch(values_a, values_b).p, rel=1e-12)
    rise = "1-D mean rise (2 draws)"
    curves = [landscape_for_checkpoint(a[1], dim=1, points=5, samples=64, draw=d) for d in range(2)]
    expected = np.mean([compare.landscape_summary(c)["mean_rise"] for c in curves])
    assert doc["numbers"]["a"][1][rise] == pytest.approx(expected, rel=1e-12)
    assert doc["bands"][0]["curves"] == 4  # 2 checkpoints x 2 draws
    # 2-D: coarse planes of every draw, the mean and max rise averaged over the draws, and
    # each checkpoint's spread over its draws.
    planes = [landscape_for_checkpoint(b[0], dim=2, points=3, samples=64, draw=d) for d in range(2)]
    rises = [compare.landscape_summary(p) for p in planes]
    for key, label in (("mean_rise", "mean rise"), ("max_rise", "max rise")):
        name = f"2-D {label} (2 draws)"
        expected = np.mean([r[key] for r in rises])
        assert doc["numbers"]["b"][0][name] == pytest.approx(expected, rel=1e-12)
        assert stats[name]["b"]["mean"] == pytest.approx(
            np.mean([n[name] for n in doc["numbers"]["b"]]), rel=1e-12
        )
    over_draws = doc["landscape_draws"]["b"][0]
    assert over_draws["checkpoint"] == b[0]
    assert over_draws["2-D"]["max_rise"]["values"] == pytest.approx([r["max_rise"] for r in rises])
    spread = np.std([r["mean_rise"] for r in rises], ddof=1) / math.sqrt(2)
    assert over_draws["2-D"]["mean_rise"]["stderr"] == pytest.approx(spread, rel=1e-9)
    text = (out / "report.md").read_text()
    assert "## Statistics over seeds and direction draws" in text and "| top eigenvalue |" in text
    assert f"| SAM: `{b[0]}` | " in text  # a row of each checkpoint's spread over draws
    assert {"1d_band.pdf", "1d_band.png"} <= set(os.listdir(out))
    assert json.loads((out / "results.json").read_text())["statistics"].keys() == stats.keys()


def test_report_says_how_many_tests_its_table_holds():
    """Four tested rows (one untested) with p = 0.001, 0.02, 0.3, 0.9: two below 0.05,
    0.2 expected by chance, Bonferroni's 0.0125 reached by one."""
    rows = {f"q{i}": {"difference": {"p": p}} for i, p in enumerate((0.001, 0.02, 0.3, 0.9))}
    rows["untested"] = {"difference": None}
    (line, blank) = report._multiple_tests(rows)
    assert line.startswith("The table holds 4 tests, 2 with p < 0.05; by chance alone about 0.2")
    assert "needs p < 0.0125 (reached by 1 of the 4)." in line and blank == ""
    assert report._multiple_tests({"q": {"difference": {"p": 0.01}}}) == []


def test_groups_on_the_command_line(tmp_path, capsys):
    a = [tiny_checkpoint(tmp_path / f"a{i}.pt", i) for i in range(2)]
    b = [tiny_checkpoint(tmp_path / f"b{i}.pt", 5 + i) for i in range(2)]
    small = ["--points", "3", "--points-2d", "3", "--samples", "32", "--trace-samples", "2"]
    out = tmp_path / "cli"
    code = main(["compare", "--a", *a, "--b", *b, "--out", str(out), "--quiet", *small])
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["settings"]["draws"] == 3 and len(doc["numbers"]["a"]) == 2
    x = str(tmp_path / "x")
    for argv, message in [
        (["compare", "--a", *a, "--out", x, *small], "--a and --b"),
        (["compare", a[0], "--out", x, *small], "A.pt B.pt"),
        (["compare", "--a", a[0], a[0], "--b", *b, "--out", x], "twice"),
        (["compare", *a, "--draws", "0", "--out", x], "draws"),
    ]:
        assert message in exit2(argv, capsys)
    assert not (tmp_path / "x").exists()


def test_groups_of_tracked_runs_get_the_four_figures_over_seeds(tmp_path, capsys):
    """Groups of real runs trained with --track-every: compare draws sharpness against
    rho, the top-k eigenvalues, the density and the eigenvalue over training, from the
    measure documents it saves beside them; `sharpscope plot` redraws each from those
    files byte for byte, and the plotted means are the statistics' means."""
    from sharpscope import figures
    from sharpscope.train import train
    from sharpscope.train_config import TrainConfig

    paths = {}
    for optimizer in ("sgd", "sam"):
        for seed in (0, 1):
            config = TrainConfig(
                optimizer=optimizer, seed=seed, steps=4, batch_size=64, model="mlp", width=8,
                track_every=2, track_samples=64,
            )  # fmt: skip
            folder = tmp_path / f"{optimizer}-{seed}"
            train(config, str(folder), quiet=True)
            paths.setdefault(optimizer, []).append(str(folder / "checkpoint.pt"))
    out = tmp_path / "cmp"
    small = {**SMALL, "rhos": (0.02, 0.05), "eigs": 3, "draws": 1}
    doc = compare.compare_checkpoints(
        paths["sgd"], paths["sam"], str(out), labels=("SGD", "SAM"), **small
    )
    for name in ("rho", "eigenvalues", "density", "training"):
        assert doc["figures"][name] == [f"{name}.pdf", f"{name}.png"]
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    a = figures.read_measure_file(out / "measure_a.json")
    b = figures.read_measure_file(out / "measure_b.json")
    assert [d["hessian"]["eigenvalues"][0] for d in a] == doc["statistics"]["top eigenvalue"][
        "values_a"
    ]
    fig = figures.plot_eigenvalues({"SGD": a, "SAM": b}, tmp_path / "e.png")
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel()
    top_means = [container.lines[0].get_ydata()[0] for container in ax.containers]
    expected = [doc["statistics"]["top eigenvalue"][k]["mean"] for k in ("a", "b")]
    assert top_means == pytest.approx(expected, rel=1e-12)
    text = (out / "report.md").read_text()
    for name in ("rho", "eigenvalues", "density", "training"):
        command = next(line for line in text.splitlines() if f"--kind {name} " in line)
        argv = command.split("Redraw: `sharpscope ")[1].rstrip("`").split()
        argv[argv.index("--out") + 1] = str(tmp_path / f"again-{name}.png")
        for i, arg in enumerate(argv):
            if arg.endswith(".json"):
                argv[i] = str(out / arg)
        assert main(argv) == 0
        assert (tmp_path / f"again-{name}.png").read_bytes() == (out / f"{name}.png").read_bytes()
