"""Malformed but harmless inputs: every damaged file and every impossible option gives one
line on stderr and exit code 2, never a traceback, and nothing is written or allocated
before the refusal."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from sharpscope.checkpoint import load_checkpoint, read_checkpoint
from sharpscope.cli import main
from sharpscope.errors import SharpscopeError
from sharpscope.landscape import landscape_for_checkpoint
from sharpscope.surface import load_surface
from tests.cli_utils import exit2

TINY = ["--data", "synthetic", "--train-subset", "64", "--model", "mlp", "--width", "8"]
TINY += ["--depth", "1", "--batch-size", "16", "--epochs", "1", "--quiet"]
MEASURE = ["measure", "--samples", "16", "--eigs", "0", "--no-trace", "--steps", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("malformed") / "run"
    assert main(["train", *TINY, "--out", str(folder)]) == 0
    return folder


DELETE = object()
CHECKPOINTS = {
    "model is a string": {"model": "mlp"},
    "model without a name": {"model": {"kwargs": {}}},
    "model kwargs a list": {"model": {"name": "mlp", "kwargs": [1]}},
    "state_dict a list": {"state_dict": [1, 2]},
    "state_dict missing": {"state_dict": DELETE},
    "state_dict of strings": {"state_dict": {"w": "x"}},
    "version a string": {"version": "x"},
    "version None": {"version": None},
    "version newer": {"version": 99},
    "config a list": {"config": [1]},
    "metrics a string": {"metrics": "x"},
    "data a number": {"data": 3},
    "unknown data set": {"data": {"name": "../../etc"}},
    "bad train_subset": {"data": {"name": "synthetic", "train_subset": "x"}},
    "synthetic too large": {"data": {"name": "synthetic", "synthetic": {"n_train": 10**12}}},
    "loss a list": {"config": {"loss": [1]}},
    "input_shape a string": {"model": {"name": "mlp", "kwargs": {"input_shape": "x"}}},
    # 16 x 10^9 weights: refused from the meta build, before a byte is allocated
    "model too large": {
        "model": {
            "name": "mlp",
            "kwargs": {"input_shape": [16], "num_classes": 4, "width": 10**9, "depth": 1},
        }
    },
    "model of another shape": {
        "model": {"name": "mlp", "kwargs": {"input_shape": [16], "num_classes": 4, "width": 9}}
    },
}


def _variant(run, tmp_path, changes: dict) -> str:
    saved = read_checkpoint(run / "checkpoint.pt")
    for key, value in changes.items():
        if value is DELETE:
            del saved[key]
        elif isinstance(value, dict) and key in ("config",):
            saved[key] = {**saved[key], **value}
        else:
            saved[key] = value
    path = str(tmp_path / "damaged.pt")
    torch.save(saved, path)
    return path


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_a_damaged_checkpoint_is_one_line_everywhere(run, tmp_path, capsys, case):
    path = _variant(run, tmp_path, CHECKPOINTS[case])
    exit2([*MEASURE, path], capsys)
    out = tmp_path / "surface.npz"
    exit2(["landscape", path, "--out", str(out), "--points", "3", "--samples", "16"], capsys)
    assert not out.exists()
    with pytest.raises(SharpscopeError):
        landscape_for_checkpoint(path, points=3, samples=16)


def test_a_model_too_large_is_refused_before_it_is_allocated(run, tmp_path, monkeypatch):
    path = _variant(run, tmp_path, CHECKPOINTS["model too large"])

    reset = torch.nn.Linear.reset_parameters

    def meta_only(layer):
        assert layer.weight.device.type == "meta", "a real Linear layer was built"
        reset(layer)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", meta_only)
    with pytest.raises(SharpscopeError, match="weights do not fit"):
        load_checkpoint(path)


RESUME_POINTS = {
    "epochs a string": ("config", "epochs", "x"),
    "lr a string": ("config", "lr", "0.1"),
    "seed a float": ("config", "seed", 0.5),
    "an unknown option": ("config", "colour", "red"),
    "step a string": ("resume", "step", "3"),
    "step negative": ("resume", "step", -1),
    "no optimizer state": ("resume", "optimizer", DELETE),
    "optimizer state a list": ("resume", "optimizer", [1]),
    "records a dict": ("resume", "records", {"a": 1}),
    "accumulators missing": ("resume", "accumulators", DELETE),
    "config a list": ("config", None, [1]),
    "a record holding a tensor": ("resume", "records", [{"kind": "epoch", "x": torch.zeros(1)}]),
    "a record without a kind": ("resume", "records", [{}]),
    "seen infinite": ("resume", "accumulators", {"loss": 0.0, "correct": 0, "seen": math.inf}),
    "correct of 1e30": ("resume", "accumulators", {"loss": 0.0, "correct": 1e30, "seen": 0}),
    "a batch beyond the epoch": ("resume", "index", 10**6),
    "a step beyond the run": ("resume", "step", 10**6),
    "momentum of the wrong shape": ("optimizer", "state", {0: {"momentum_buffer": torch.zeros(3)}}),
    "state of a parameter the model lacks": ("optimizer", "state", {999: {}}),
    "complex weights": ("state_dict", "1.weight", torch.zeros(8, 16, dtype=torch.complex64)),
}


@pytest.mark.parametrize("case", list(RESUME_POINTS))
def test_a_damaged_resume_point_is_one_line_and_left_as_it_was(run, tmp_path, capsys, case):
    entry, key, value = RESUME_POINTS[case]
    saved = read_checkpoint(run / "resume.pt")
    saved["resume"] = {**saved["resume"], "complete": False}  # a run to continue
    if entry == "optimizer":  # inside the resume state
        saved["resume"] = {**saved["resume"], "optimizer": dict(saved["resume"]["optimizer"])}
        saved["resume"]["optimizer"][key] = value
    elif entry == "resume" and key == "accumulators" and value is not DELETE:
        saved["resume"] = {**saved["resume"], "accumulators": {"skipped": 0, **value}}
    elif key is None:
        saved[entry] = value
    else:
        saved[entry] = dict(saved[entry])
        if value is DELETE:
            del saved[entry][key]
        else:
            saved[entry][key] = value
    folder = tmp_path / "run"
    folder.mkdir()
    torch.save(saved, folder / "resume.pt")
    before = (folder / "resume.pt").read_bytes()
    exit2(["train", "--out", str(folder), "--resume", "--quiet"], capsys)
    assert (folder / "resume.pt").read_bytes() == before
    assert sorted(os.listdir(folder)) == ["resume.pt"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", *TINY, "--width", "1000000000"], "would take"),
        (["train", *TINY, "--seed", str(2**64)], "--seed"),
        (["train", *TINY, "--seed", "-1"], "--seed"),
        (["train", *TINY, "--device", "meta"], "unsupported device"),
        (["train", *TINY[:4], "--model", ":"], "unknown model"),
        (["train", *TINY[:4], "--model", "os:"], "unknown model"),
        (["train", *TINY, "--out", ""], "--out is empty"),
        (["train", *TINY, "--lr", "1e39"], "--lr must be a finite number"),
        (["train", *TINY, "--weight-decay", "1e308"], "--weight-decay must be a finite number"),
        (["train", *TINY[:4], "--model", "os:getcwd"], "did not return a torch.nn.Module"),
        (["train", *TINY, "--depth", "100000"], "at most 1000"),
    ],
)
def test_impossible_training_options(tmp_path, capsys, argv, message):
    argv = [*argv, "--out", str(tmp_path / "run")] if "--out" not in argv else argv
    assert message in exit2(argv, capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seed", str(2**64)], "--seed"),
        (["--device", "meta"], "unsupported device"),
        (["--model", ":", "--data", "synthetic"], "unknown model"),
        (["--json", ""], "empty"),
    ],
)
def test_impossible_measure_options(run, capsys, extra, message):
    assert message in exit2([*MEASURE, str(run / "checkpoint.pt"), *extra], capsys)


@pytest.mark.parametrize(
    "extra",
    [
        ["--dim", "2", "--points", "100000000"],
        ["--points", "1000000000"],
        ["--dim", "2", "--points", "1000000", "2"],
        ["--seed", str(2**63)],
    ],
)
def test_impossible_landscape_options_allocate_nothing(run, tmp_path, capsys, extra):
    out = tmp_path / "surface.npz"
    exit2(["landscape", str(run / "checkpoint.pt"), "--out", str(out), *extra], capsys)
    assert os.listdir(tmp_path) == []


def test_sharpscope_alone_is_a_one_line_usage_hint(capsys):
    assert "usage: sharpscope COMMAND" in exit2([], capsys)


@pytest.fixture(scope="module")
def surface(run, tmp_path_factory):
    path = tmp_path_factory.mktemp("surface") / "good.npz"
    argv = ["landscape", str(run / "checkpoint.pt"), "--out", str(path), "--points", "5"]
    assert main([*argv, "--samples", "16", "--quiet"]) == 0
    return dict(np.load(path))


def _settings(surface, **changes) -> np.ndarray:
    return np.asarray(json.dumps({**json.loads(str(surface["settings"])), **changes}))


SURFACES = {
    "0-d coordinates": lambda s: {"coords_a": np.array(1.0)},
    "string coordinates": lambda s: {"coords_a": np.array(["a"] * 5)},
    "infinite coordinates": lambda s: {"coords_a": np.array([0, np.inf, 1, 2, 3.0])},
    "decreasing coordinates": lambda s: {"coords_a": s["coords_a"][::-1]},
    "string losses": lambda s: {"loss": np.array(["a"] * 5)},
    "complex losses": lambda s: {"loss": s["loss"] + 1j},
    "losses of 1e308": lambda s: {"loss": np.full(5, 1e308)},
    "boolean losses": lambda s: {"loss": np.ones(5, dtype=bool)},
    "losses of another shape": lambda s: {"loss": np.ones(4)},
    "accuracy above 1": lambda s: {"accuracy": np.full(5, 2.0)},
    "a label that is a list": lambda s: {"settings": _settings(s, label=[1, 2])},
    "a label that is a number": lambda s: {"settings": _settings(s, label=5)},
    "labels not two strings": lambda s: {"settings": _settings(s, labels=["a", 1])},
    "settings a list": lambda s: {"settings": np.asarray(json.dumps([1]))},
    "settings not JSON": lambda s: {"settings": np.asarray("{")},
    "kind a number": lambda s: {"settings": _settings(s, kind=3)},
    "trajectory of strings": lambda s: {"trajectory": np.array([["a", "b"]])},
    "no loss": lambda s: {"loss": DELETE},
}


@pytest.mark.parametrize("case", list(SURFACES))
def test_a_damaged_surface_is_one_line_and_draws_nothing(surface, tmp_path, capsys, case):
    arrays = dict(surface)
    for key, value in SURFACES[case](surface).items():
        if value is DELETE:
            del arrays[key]
        else:
            arrays[key] = value
    path = tmp_path / "damaged.npz"
    np.savez(path, **arrays)
    figure = tmp_path / "figure.png"
    assert "damaged.npz" in exit2(["plot", str(path), "--out", str(figure)], capsys)
    assert not figure.exists()
    with pytest.raises(SharpscopeError):
        load_surface(path)


def test_an_npz_whose_arrays_would_not_fit_is_refused_from_its_headers(tmp_path, monkeypatch):
    import sharpscope.surface as surface_module

    path = tmp_path / "big.npz"
    np.savez(path, loss=np.zeros(1000), coords_a=np.zeros(1000))
    monkeypatch.setattr(surface_module, "MAX_SURFACE_BYTES", 8000)  # 16,000 bytes of arrays
    with pytest.raises(SharpscopeError, match="would take"):
        load_surface(path)


def test_a_2d_surface_with_one_point_on_an_axis_is_refused_by_plot(run, tmp_path, capsys):
    path = tmp_path / "thin.npz"
    argv = ["landscape", str(run / "checkpoint.pt"), "--out", str(path), "--dim", "2"]
    assert main([*argv, "--points", "1", "2", "--samples", "16", "--quiet"]) == 0
    assert "at least 2 points" in exit2(
        ["plot", str(path), "--out", str(tmp_path / "f.png")], capsys
    )


def test_an_npz_member_numpy_would_read_instead_of_its_npy_counts(surface, tmp_path, monkeypatch):
    import zipfile

    import sharpscope.surface as surface_module

    path = tmp_path / "two_losses.npz"
    np.savez(path, **surface)
    big = tmp_path / "big.npy"
    np.save(big, np.zeros(10_000))
    with zipfile.ZipFile(path, "a") as archive:  # a plain "loss": numpy reads it for "loss"
        archive.write(big, "loss")
    monkeypatch.setattr(surface_module, "MAX_SURFACE_BYTES", 40_000)  # below the 80,000 bytes
    with pytest.raises(SharpscopeError, match="would take"):
        load_surface(path)


def test_a_checkpoint_with_a_compressed_record_is_refused_before_it_inflates(run, tmp_path):
    import zipfile

    source = zipfile.ZipFile(run / "checkpoint.pt")
    path = tmp_path / "inflating.pt"
    with source, zipfile.ZipFile(path, "w") as archive:
        for info in source.infolist():
            archive.writestr(info.filename, source.read(info), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(SharpscopeError, match="compressed"):
        read_checkpoint(path)


def test_a_model_deeper_than_any_is_refused_before_it_is_built(run, tmp_path, capsys):
    deep = {"name": "mlp", "kwargs": {"input_shape": [16], "num_classes": 4, "depth": 10**5}}
    path = _variant(run, tmp_path, {"model": deep})
    assert "at most 1000" in exit2([*MEASURE, path], capsys)
