import json
import math
import os

import pytest
import torch

import sharpscope.commands.measure as measure_command
from sharpscope.checkpoint import save_checkpoint
from sharpscope.cli import main
from sharpscope.data import data_spec, load_dataset
from sharpscope.errors import SharpscopeError
from sharpscope.hessian import hessian_eigenvalues, hessian_trace
from sharpscope.losses import mse
from sharpscope.measure import format_table, measure, measure_checkpoint
from sharpscope.models import build_model, model_spec
from sharpscope.sharpness import average_sharpness, sharpness

FAST = ["--samples", "64", "--trace-samples", "4", "--steps", "3", "--quiet"]


def strict_json(text):
    """json.loads that refuses NaN and Infinity (not JSON)."""

    def refuse(constant):
        raise ValueError(f"{constant} in JSON")

    return json.loads(text, parse_constant=refuse)


def save(path, spec, state_dict, config=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        path,
        {
            "model": spec,
            "data": data_spec("digits"),
            "config": config or {},
            "metrics": {},
            "state_dict": state_dict,
        },
    )
    return str(path)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    spec = model_spec("mlp", (1, 8, 8), 10, width=8, depth=1)
    model = build_model(spec)
    return save(tmp_path / "run" / "checkpoint.pt", spec, model.state_dict()), model


def test_document_numbers_equal_the_analyzers_on_the_same_examples(checkpoint):
    path, model = checkpoint
    doc = measure_checkpoint(
        path, samples=64, rhos=(0.05, 0.1), steps=3, eigs=2, trace_samples=4, seed=3
    )
    x, y = load_dataset("digits").examples("train", 64, seed=3)
    top = hessian_eigenvalues(model, (x, y), k=2, seed=3)
    assert doc["hessian"]["eigenvalues"] == pytest.approx(top.eigenvalues, rel=1e-5)
    assert doc["hessian"]["eigenvalues"][0] >= doc["hessian"]["eigenvalues"][1]
    trace = hessian_trace(model, (x, y), samples=4, seed=3)
    assert doc["hessian"]["trace"]["value"] == pytest.approx(trace.value, rel=1e-6)
    assert [e["rho"] for e in doc["sharpness"]] == [0.05, 0.1]
    direct = sharpness(model, (x, y), 0.1, steps=3, seed=3)
    assert doc["sharpness"][1]["value"] == pytest.approx(direct.value, rel=1e-6)
    assert doc["sharpness"][0]["norm"] == "l2" and doc["sharpness"][0]["m"] is None
    assert doc["n_examples"] == 64 and doc["split"] == "train" and doc["seed"] == 3
    assert doc["dtype"] == "float32" and doc["param_filter"] == "all"
    assert set(doc["loss"]) == {"train", "test"} and "stderr" in doc["hessian"]["trace"]
    assert doc["model"]["name"] == "mlp" and doc["checkpoint"] == path
    table = format_table([doc, doc], ["a", "b"])
    assert "Hessian eigenvalue 2" in table and "sharpness l2 rho=0.1" in table


def test_every_setting_is_recorded_next_to_its_number(checkpoint):
    path, model = checkpoint
    doc = measure_checkpoint(
        path,
        split="test",
        samples=40,
        rhos=(0.02,),
        norm="linf",
        adaptive=True,
        eta=0.01,
        m=20,
        steps=2,
        restarts=2,
        average=True,
        average_samples=3,
        eigs=1,
        trace=False,
        param_filter="weights",
        seed=5,
    )
    entry = doc["sharpness"][0]
    expected = {"rho": 0.02, "norm": "linf", "adaptive": True, "eta": 0.01, "m": 20}
    expected.update({"steps": 2, "restarts": 2, "seed": 5, "split": "test", "n_examples": 40})
    assert {k: entry[k] for k in expected} == expected
    assert len(entry["per_batch"]) == 2 and entry["param_filter"] == "weights"
    x, y = load_dataset("digits").examples("test", 40, seed=5)
    direct = average_sharpness(
        model,
        (x, y),
        0.02,
        norm="linf",
        adaptive=True,
        eta=0.01,
        samples=3,
        seed=5,
        param_filter="weights",
    )
    assert doc["average_sharpness"][0]["value"] == pytest.approx(direct.value, rel=1e-6)
    assert doc["hessian"]["eigenvalue_settings"]["param_filter"] == "weights"
    assert "trace" not in doc["hessian"] and doc["split"] == "test"


def test_model_is_left_as_it_was_and_float64_is_measured_in_float64(checkpoint):
    _, model = checkpoint
    model = model.double().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    doc = measure(
        model, load_dataset("digits"), samples=32, steps=2, trace_samples=2, eigs=1, loss="mse"
    )
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert doc["dtype"] == "float64" and doc["loss_function"] == "mse"
    x, y = load_dataset("digits").examples("train", 32, seed=0)
    assert doc["loss"]["train"] == pytest.approx(mse(model.eval()(x.double()), y).item(), 1e-12)


def test_cli_prints_a_table_and_writes_strict_json(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    out = tmp_path / "m.json"
    args = ["measure", path, path, "--json", str(out), "--labels", "A", "B", "--density"]
    assert main([*args, *FAST]) == 0
    printed = capsys.readouterr().out
    for row in ("train loss", "test accuracy", "sharpness l2 rho=0.05", "Hessian trace"):
        assert row in printed
    assert "Hessian eigenvalue 1" in printed and "A" in printed
    doc = strict_json(out.read_text())
    assert doc["command"] == "measure" and len(doc["results"]) == 2
    entry = doc["results"][0]
    assert entry["hessian"]["eigenvalues"] and entry["sharpness"][0]["value"] >= 0
    assert len(entry["hessian"]["density"]["grid"]) == len(entry["hessian"]["density"]["density"])


def test_cli_options_reach_the_document(checkpoint, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "m.json"
    extra = ["--rho", "0.01", "0.1", "--norm", "linf", "--m-sharpness", "32", "--restarts", "2"]
    extra += ["--eigs", "2", "--smallest", "--no-trace", "--average", "--average-samples", "2"]
    assert main(["measure", path, "--json", str(out), *FAST, *extra]) == 0
    entry = strict_json(out.read_text())["results"][0]
    assert [(s["rho"], s["norm"], s["m"], s["restarts"]) for s in entry["sharpness"]] == [
        (0.01, "linf", 32, 2),
        (0.1, "linf", 32, 2),
    ]
    hessian = entry["hessian"]
    assert len(hessian["smallest_eigenvalues"]) == 2 and "trace" not in hessian
    assert hessian["smallest_eigenvalues"][0] <= hessian["eigenvalues"][-1]
    assert [a["samples"] for a in entry["average_sharpness"]] == [2, 2]


def test_plain_state_dict_needs_model_and_data(checkpoint, tmp_path, capsys):
    _, model = checkpoint
    sd = tmp_path / "sd.pt"
    torch.save(model.state_dict(), sd)
    assert main(["measure", str(sd), *FAST]) == 2
    assert "--model" in capsys.readouterr().err
    named = ["--model", "mlp", "--width", "8", "--depth", "1", "--data", "digits"]
    assert main(["measure", str(sd), *named, *FAST]) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--rho", "0"], "rho must be positive"),
        (["--rho", "0.05", "-1"], "rho must be positive"),
        (["--samples", "0"], "samples must be positive"),
        (["--eigs", "100000"], "exceeds"),
        (["--eigs", "0", "--smallest"], "eigs >= 1"),
        (["--m", "0"], "m must be a positive"),
        (["--eta", "-1", "--adaptive"], "eta must be >= 0"),
        (["--steps", "0"], "steps >= 1 and restarts >= 1"),
        (["--trace-samples", "1"], "at least 2 probes"),
        (["--json", "/nonexistent/dir/x.json"], "does not exist"),
        (["--width", "16"], "weights do not fit"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(checkpoint, capsys, extra, message):
    path, _ = checkpoint
    assert main(["measure", path, *FAST, *extra]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1
    assert captured.out == ""


def test_a_bad_later_checkpoint_stops_before_any_measuring(checkpoint, tmp_path, monkeypatch):
    path, model = checkpoint
    broken = {k: v.clone() for k, v in model.state_dict().items()}
    next(iter(broken.values())).fill_(math.nan)
    spec = model_spec("mlp", (1, 8, 8), 10, width=8, depth=1)
    nan_path = save(tmp_path / "nan" / "checkpoint.pt", spec, broken)
    unknown = save(tmp_path / "unknown" / "checkpoint.pt", {**spec, "name": "nope"}, broken)
    calls = []
    monkeypatch.setattr(measure_command, "measure", lambda *a, **k: calls.append(a))
    with pytest.raises(SharpscopeError, match="nothing to measure"):
        measure_command.run(measure_command_args([path, nan_path]))
    with pytest.raises(SharpscopeError, match="nope"):
        measure_command.run(measure_command_args([path, unknown]))
    with pytest.raises(SharpscopeError, match="no such file"):
        measure_command.run(measure_command_args([path, str(tmp_path / "missing.pt")]))
    assert calls == []


def measure_command_args(paths):
    from sharpscope.cli import build_parser

    return build_parser().parse_args(["measure", *paths, *FAST])


def test_unreadable_and_unsafe_checkpoints_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    assert main(["measure", str(bad), *FAST]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    assert main(["measure", str(tmp_path / "missing.pt"), *FAST]) == 2
    assert "no such file" in capsys.readouterr().err

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    assert main(["measure", str(tmp_path / "evil.pt"), *FAST]) == 2
    assert "arbitrary unpickling" in capsys.readouterr().err


def test_checkpoint_loss_is_used_unless_overridden(tmp_path):
    torch.manual_seed(0)
    spec = model_spec("mlp", (1, 8, 8), 10, width=8, depth=1)
    model = build_model(spec)
    path = save(tmp_path / "c.pt", spec, model.state_dict(), config={"loss": "mse"})
    kwargs = {"samples": 16, "rhos": (), "eigs": 0, "trace": False}
    x, y = load_dataset("digits").examples("train", 16, seed=0)
    with torch.no_grad():
        expected = mse(model(x), y).item()
    assert measure_checkpoint(path, **kwargs)["loss"]["train"] == pytest.approx(expected, 1e-6)
    assert measure_checkpoint(path, loss="ce", **kwargs)["loss_function"] == "ce"


def test_table_marks_numbers_a_document_lacks(checkpoint):
    path, _ = checkpoint
    full = measure_checkpoint(path, samples=16, steps=1, trace_samples=2, eigs=2)
    short = measure_checkpoint(path, samples=16, steps=1, eigs=1, trace=False)
    lines = format_table([full, short], ["full", "short"]).splitlines()
    second = next(line for line in lines if line.startswith("Hessian eigenvalue 2"))
    assert second.split()[-1] == "-"
    assert next(line for line in lines if line.startswith("Hessian trace")).endswith("-")


def test_sampling_error_over_disjoint_sets_of_examples(checkpoint, capsys, monkeypatch):
    """--subsets K: the sharpness and the top eigenvalue on K disjoint sets of `samples`
    examples, each the number an analyzer gives on that set, with their mean ± s.e.; the
    first set is the one every other number is measured on."""
    import sys

    measure_module = sys.modules["sharpscope.measure"]  # the package's `measure` is the function
    path, model = checkpoint
    doc = measure_checkpoint(path, samples=48, subsets=3, steps=3, trace=False, seed=2)
    sets = load_dataset("digits").example_subsets("train", 48, 3, seed=2)
    indices = [set(map(tuple, x.reshape(48, -1).tolist())) for x, _ in sets]
    assert all(not (indices[i] & indices[j]) for i in range(3) for j in range(i + 1, 3))
    assert torch.equal(sets[0][0], load_dataset("digits").examples("train", 48, seed=2)[0])
    eigen = [hessian_eigenvalues(model, s, k=1, seed=2).eigenvalues[0] for s in sets]
    rises = [sharpness(model, s, 0.05, steps=3, seed=2).value for s in sets]
    sampling = doc["sampling"]
    assert sampling["top_eigenvalue"]["values"] == pytest.approx(eigen, rel=1e-5)
    assert sampling["sharpness"]["values"] == pytest.approx(rises, rel=1e-5)
    assert sampling["top_eigenvalue"]["mean"] == pytest.approx(sum(eigen) / 3, rel=1e-5)
    assert sampling["top_eigenvalue"]["values"][0] == pytest.approx(
        doc["hessian"]["eigenvalues"][0], rel=1e-9
    )
    monkeypatch.setattr(measure_module, "LARGE_SAMPLING_ERROR", 0.0)  # every error "large"
    assert main(["measure", path, "--samples", "48", "--subsets", "3", "--no-trace",
                 "--steps", "2", "--quiet"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "eigenvalue 1 over 3 sets" in out and "note: " in out and "more examples" in out
    with pytest.raises(SharpscopeError, match="disjoint sets"):
        measure_checkpoint(path, samples=1000, subsets=3)


def test_sampling_error_of_data_given_as_tensors_or_a_loader(checkpoint):
    """The API with the user's own data: subsets=K measures the sharpness and the top
    eigenvalue on K disjoint parts of it (split_parts), each what the analyzers give on
    that part, for tensors and for a DataLoader alike; bad parts are refused before any
    work."""
    from torch.utils.data import DataLoader, TensorDataset

    from sharpscope.batches import split_parts

    _, model = checkpoint
    x, y = load_dataset("digits").examples("train", 96, seed=0)
    options = {"steps": 2, "trace": False, "seed": 1}
    doc = measure(model, (x, y), subsets=3, **options)
    parts = split_parts((x, y), 3, seed=1)
    eigen = [hessian_eigenvalues(model, p, k=1, seed=1).eigenvalues[0] for p in parts]
    rises = [sharpness(model, p, 0.05, steps=2, seed=1).value for p in parts]
    assert doc["sampling"]["samples"] == 32 and doc["sampling"]["subsets"] == 3
    assert doc["sampling"]["top_eigenvalue"]["values"] == pytest.approx(eigen, rel=1e-5)
    assert doc["sampling"]["sharpness"]["values"] == pytest.approx(rises, rel=1e-5)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    streamed = measure(model, loader, subsets=2, **options)
    dealt = [torch.cat([b[0] for b in p]) for p in split_parts(loader, 2)]
    labels = [torch.cat([b[1] for b in p]) for p in split_parts(loader, 2)]
    expected = [
        hessian_eigenvalues(model, (a, b), k=1, seed=1).eigenvalues[0]
        for a, b in zip(dealt, labels, strict=True)
    ]
    assert streamed["sampling"]["top_eigenvalue"]["values"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(SharpscopeError, match="cannot be split into 200"):
        measure(model, (x, y), subsets=200, **options)


def test_correlate_over_checkpoints_prints_and_writes_kendalls_tau(tmp_path, capsys):
    spec = model_spec("mlp", (1, 8, 8), 10, width=8, depth=1)
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        paths.append(
            save(tmp_path / f"r{seed}" / "checkpoint.pt", spec, build_model(spec).state_dict())
        )
    out = tmp_path / "m.json"
    argv = ["measure", *paths, "--samples", "32", "--no-trace", "--steps", "2", "--quiet"]
    scatter = tmp_path / "tau.pdf"
    assert main([*argv, "--correlate", "--json", str(out), "--scatter", str(scatter)]) == 0
    assert scatter.read_bytes().startswith(b"%PDF")
    assert "Kendall's tau with the accuracy gap" in capsys.readouterr().out
    saved = strict_json(out.read_text())
    gaps = [r["accuracy"]["train"] - r["accuracy"]["test"] for r in saved["results"]]
    assert saved["correlation"]["gaps"] == pytest.approx(gaps)
    assert set(saved["correlation"]["measures"]) == {"sharpness (rho 0.05)", "top eigenvalue"}
    assert main(["measure", *paths[:2], "--correlate"]) == 2
    assert "at least 3" in capsys.readouterr().err
    assert main(["measure", *paths, "--scatter", str(tmp_path / "s.png")]) == 2
    assert "give --correlate" in capsys.readouterr().err
    assert main(["measure", *paths, "--correlate", "--scatter", str(tmp_path / "s.txt")]) == 2
    capsys.readouterr()
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "s.txt").exists()
