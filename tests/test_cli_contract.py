"""The input and output contract of the commands: an output is never a folder, an input, or an
existing file unless --overwrite; a place that cannot be written is refused before any
work, in one line on stderr with exit code 2."""

from __future__ import annotations

import os

import pytest

from sharpscope import TrainConfig, train
from sharpscope.cli import main

FAST_MEASURE = ["--samples", "32", "--eigs", "0", "--no-trace", "--steps", "2", "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "run"
    config = TrainConfig(data="synthetic", train_subset=64, model="mlp", width=8, depth=1)
    train(TrainConfig(**{**vars(config), "steps": 4}), out, quiet=True)
    return out


def _refused(argv: list[str], capsys, message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_measure_never_writes_over_its_checkpoint_or_an_existing_file(run, tmp_path, capsys):
    ckpt = run / "checkpoint.pt"
    before = ckpt.read_bytes()
    for extra in ([], ["--overwrite"]):
        _refused(["measure", str(ckpt), *FAST_MEASURE, "--json", str(ckpt), *extra], capsys,
                 "is an input of this command")  # fmt: skip
    assert ckpt.read_bytes() == before
    mine = tmp_path / "mine.json"
    mine.write_text('{"mine": 1}')
    _refused(["measure", str(ckpt), *FAST_MEASURE, "--json", str(mine)], capsys, "--overwrite")
    assert mine.read_text() == '{"mine": 1}'
    assert main(["measure", str(ckpt), *FAST_MEASURE, "--json", str(mine), "--overwrite"]) == 0
    assert '"results"' in mine.read_text()


@pytest.mark.parametrize("command", ["measure", "landscape", "plot"])
@pytest.mark.parametrize(
    "where, message",
    [
        ("folder", "it is a folder"),
        ("under-a-file", "is a file, not a folder"),
        ("proc", "cannot write"),
        ("missing", "does not exist"),
    ],
)
def test_unwritable_outputs_are_refused_before_any_work(
    run, tmp_path, capsys, command, where, message
):
    (tmp_path / "a.file").write_text("")
    ext = {"measure": "json", "landscape": "npz", "plot": "png"}[command]
    (tmp_path / f"dir.{ext}").mkdir()
    target = {
        "folder": tmp_path / f"dir.{ext}",
        "under-a-file": tmp_path / "a.file" / f"x.{ext}",
        "proc": f"/proc/x.{ext}",
        "missing": tmp_path / "nowhere" / f"x.{ext}",
    }[where]
    ckpt = str(run / "checkpoint.pt")
    if command == "measure":
        argv = ["measure", ckpt, *FAST_MEASURE, "--json", str(target)]
    elif command == "landscape":
        argv = ["landscape", ckpt, "--points", "3", "--samples", "16", "--out", str(target)]
    else:
        surface = tmp_path / "s.npz"
        assert (
            main(["landscape", ckpt, "--points", "3", "--samples", "16", "--out", str(surface)])
            == 0
        )
        capsys.readouterr()
        argv = ["plot", str(surface), "--out", str(target)]
    before = sorted(os.listdir(tmp_path))
    _refused(argv, capsys, message)
    assert sorted(os.listdir(tmp_path)) == before


def test_train_into_a_place_that_cannot_be_written(tmp_path, capsys):
    _refused(["train", "--steps", "2", "--quiet", "--out", "/proc/run"], capsys, "sharpscope train")


def test_a_checkpoint_measured_on_data_its_model_cannot_take(run, capsys):
    argv = ["measure", str(run / "checkpoint.pt"), "--data", "digits", *FAST_MEASURE]
    _refused(argv, capsys, "the model cannot be evaluated on this data")
    argv = ["landscape", str(run / "checkpoint.pt"), "--points", "3", "--samples", "16"]
    (run / "nan").mkdir(exist_ok=True)
    _refused([*argv, "--out", str(run / "nan")], capsys, "it is a folder")


def test_plain_pickles_are_refused_in_one_line(tmp_path, capsys):
    import pickle

    with open(tmp_path / "p.pt", "wb") as f:
        pickle.dump({"weights": [1.0, 2.0]}, f)  # torch.load warns about such files
    _refused(["measure", str(tmp_path / "p.pt")], capsys, "not a readable checkpoint")
    _refused(["measure", str(tmp_path)], capsys, "a folder, not a checkpoint file")


def test_negative_numbers_in_any_notation_are_values(run, tmp_path, capsys):
    out = tmp_path / "r.npz"
    argv = ["landscape", str(run / "checkpoint.pt"), "--points", "3", "--samples", "16"]
    assert main([*argv, "--range", "-1e-3", "1e-3", "--out", str(out), "--quiet"]) == 0
    _refused([*argv, "--range", "-inf", "inf", "--out", str(tmp_path / "i.npz")], capsys, "finite")


def test_density_without_json_is_refused_before_the_work(run, capsys):
    _refused(["measure", str(run / "checkpoint.pt"), "--density"], capsys, "--json")


def test_unknown_arguments_are_named_by_their_command(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["plot", "a.npz", "--out", "f.png", "--labels", "x", "--bogus"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("sharpscope plot: error: unrecognized arguments")


def test_a_grid_whose_final_write_fails_keeps_its_points(run, tmp_path, capsys, monkeypatch):
    from sharpscope.grid import PointEvaluator
    from sharpscope.surface import Surface, load_surface

    out = tmp_path / "g.npz"
    argv = ["landscape", str(run / "checkpoint.pt"), "--dim", "2", "--points", "3"]
    argv += ["--samples", "16", "--out", str(out)]
    save = Surface.save

    def full_disk(self, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(Surface, "save", full_disk)
    _refused(argv, capsys, "No space left on device")
    assert not out.exists() and (tmp_path / "g.partial.npz").exists()
    monkeypatch.setattr(Surface, "save", save)
    monkeypatch.setattr(PointEvaluator, "__call__", None)  # nothing may be recomputed
    assert main([*argv, "--resume", "--quiet"]) == 0
    assert load_surface(out).loss.shape == (3, 3)
    assert not (tmp_path / "g.partial.npz").exists()
