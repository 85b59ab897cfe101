import json
import os

import pytest
import torch

from sharpscope.checkpoint import save_checkpoint
from sharpscope.cli import main
from sharpscope.data import data_spec, load_dataset
from sharpscope.hessian import hessian_eigenvalues
from sharpscope.measure import format_table, measure_checkpoint
from sharpscope.models import build_model, model_spec
from sharpscope.sharpness import sharpness

FAST = ["--samples", "64", "--trace-samples", "4", "--steps", "3", "--quiet"]


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    spec = model_spec("mlp", (1, 8, 8), 10, width=8, depth=1)
    model = build_model(spec)
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
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
    return str(path), model


def test_document_numbers_equal_the_analyzers_on_the_same_examples(checkpoint):
    path, model = checkpoint
    doc = measure_checkpoint(
        path, samples=64, rhos=(0.05, 0.1), steps=3, eigs=2, trace_samples=4, seed=3
    )
    x, y = load_dataset("digits").examples("train", 64, seed=3)
    top = hessian_eigenvalues(model.double().float(), (x, y), k=2, seed=3)
    assert doc["hessian"]["eigenvalues"] == pytest.approx(top.eigenvalues, rel=1e-5)
    assert [e["rho"] for e in doc["sharpness"]] == [0.05, 0.1]
    direct = sharpness(model, (x, y), 0.1, steps=3, seed=3)
    assert doc["sharpness"][1]["value"] == pytest.approx(direct.value, rel=1e-6)
    assert doc["sharpness"][0]["norm"] == "l2" and doc["sharpness"][0]["m"] is None
    assert doc["n_examples"] == 64 and doc["split"] == "train" and doc["seed"] == 3
    assert set(doc["loss"]) == {"train", "test"} and "stderr" in doc["hessian"]["trace"]
    assert doc["model"]["name"] == "mlp" and doc["checkpoint"] == path
    table = format_table([doc, doc], ["a", "b"])
    assert "Hessian eigenvalue 2" in table and "sharpness l2 rho=0.1" in table


def test_cli_prints_a_table_and_writes_json(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    out = tmp_path / "m.json"
    assert main(["measure", path, path, "--json", str(out), "--labels", "A", "B", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "train accuracy" in printed and "A" in printed
    doc = json.loads(out.read_text())
    assert doc["command"] == "measure" and len(doc["results"]) == 2
    entry = doc["results"][0]
    assert entry["hessian"]["eigenvalues"] and entry["sharpness"][0]["value"] >= 0


def test_plain_state_dict_needs_model_and_data(checkpoint, tmp_path, capsys):
    _, model = checkpoint
    sd = tmp_path / "sd.pt"
    torch.save(model.state_dict(), sd)
    assert main(["measure", str(sd), *FAST]) == 2
    assert "--model" in capsys.readouterr().err
    code = main(
        [
            "measure",
            str(sd),
            "--model",
            "mlp",
            "--width",
            "8",
            "--depth",
            "1",
            "--data",
            "digits",
            *FAST,
        ]
    )
    assert code == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rho", "0"], "rho must be positive"),
        (["--rho", "-1"], "rho must be positive"),
        (["--samples", "0"], "--samples must be positive"),
        (["--eigs", "100000"], "exceeds"),
        (["--json", "/nonexistent/dir/x.json"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(checkpoint, capsys, extra, message):
    path, _ = checkpoint
    assert main(["measure", path, *FAST, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_unreadable_and_unsafe_checkpoints_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    assert main(["measure", str(bad), *FAST]) == 2
    assert main(["measure", str(tmp_path / "missing.pt"), *FAST]) == 2

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    assert main(["measure", str(tmp_path / "evil.pt"), *FAST]) == 2
    assert "arbitrary unpickling" in capsys.readouterr().err
