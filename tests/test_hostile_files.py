"""Files are data, never code: hostile checkpoints and resume points.

A checkpoint or resume point is a dict of plain values read with
``torch.load(weights_only=True)``; what it *says* must not become code either:

1. a model factory it names (``module:attr``) is imported and called only when the user
   names the same factory (``--model module:attr``, ``model=`` or ``trust_code=True``);
   otherwise one line on stderr, exit 2, nothing imported or run;
2. the data folder and download flag it records are ignored: folders and downloads
   come only from the user's ``--data-dir`` / ``--download`` (``data_dir=`` / ``download=``);
3. a data set it names that is not a registry one is refused; the user's own data it
   names (a ``.npz`` / ``.pt`` file, an image folder, a ``module:factory`` or
   ``file.py:factory``) is opened, or its code run, only when the user names data
   (``--data``, ``data=``) or with ``trust_code=True``.

Every payload would leave a marker file if it ran. Each is tried against every command
that reads checkpoints (measure, landscape 1-D / 2-D / interpolation, compare,
train --resume) and the matching API functions. The checkpoints are built once per
module from two tiny training runs (an mlp, and a factory of this module).
"""

from __future__ import annotations

import math
import pickle
import shutil
import socket
import sys
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope import userdata
from sharpscope.checkpoint import (
    load_checkpoint,
    load_model_and_data,
    read_checkpoint,
    save_checkpoint,
)
from sharpscope.cli import main
from sharpscope.compare import compare_checkpoints
from sharpscope.errors import SharpscopeError
from sharpscope.landscape import interpolation_for_checkpoints, landscape_for_checkpoint
from sharpscope.measure import measure_checkpoint
from sharpscope.models import build_model, model_spec
from sharpscope.train import TrainConfig, load_run_config, train

# -- factories of this module -------------------------------------------------------------
BENIGN = f"{__name__}:benign"  # tests.test_hostile_files:benign under pytest
EVIL = f"{__name__}:evil_factory"

# Where evil_factory writes when a file does not tell it (set by the module fixture).
_EVIL_MARKER: list[str] = []


class Benign(nn.Module):
    """A small MLP whose state_dict keys differ from sharpscope's mlp (``body.*``)."""

    def __init__(self, input_shape, num_classes: int, width: int = 8, depth: int = 1):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = math.prod(input_shape)
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.Tanh()]
            fan_in = width
        self.body = nn.Sequential(*layers, nn.Linear(fan_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def benign(input_shape, num_classes: int, width: int = 8, depth: int = 1) -> nn.Module:
    """The user's own model factory: fine to run when the user names it."""
    return Benign(input_shape, num_classes, width, depth)


def evil_factory(*args, marker: str | None = None, **kwargs) -> nn.Module:
    """A factory a hostile file names: it writes the marker whenever it is called."""
    Path(marker or _EVIL_MARKER[0]).write_text("evil_factory ran")
    return nn.Linear(1, 1)


# A module that writes the marker as soon as it is imported (its folder is put on
# sys.path by the module fixture): a file naming it must not even import it.
PROBE = "sharpscope_hostile_import_probe"
PROBE_SOURCE = """\
from pathlib import Path

Path({marker!r}).write_text("imported")


def factory(*args, **kwargs):
    Path({marker!r}).write_text("called")
"""

# Each payload: (model name, kwargs) of a hostile file; every one writes the marker if run.
PAYLOADS = (
    "os_system",
    "subprocess_run",
    "builtins_open",
    "runpy_run_path",
    "factory_in_test_module",
    "module_that_runs_on_import",
    "file_that_runs_on_import",
)


def _payloads(marker: Path, script: Path, evil_file: Path) -> dict[str, tuple[str, dict]]:
    return {
        "os_system": ("os:system", {"command": f"touch {marker}"}),
        "subprocess_run": ("subprocess:run", {"args": ["touch", str(marker)]}),
        "builtins_open": ("builtins:open", {"file": str(marker), "mode": "w"}),
        "runpy_run_path": ("runpy:run_path", {"path_name": str(script)}),
        "factory_in_test_module": (EVIL, {"marker": str(marker)}),
        "module_that_runs_on_import": (f"{PROBE}:factory", {}),
        "file_that_runs_on_import": (f"{evil_file}:factory", {}),
    }


# The user's own data a file names (rule 3): opened or run only when the user names data.
# Each would leave the marker: the factories on import, the files and the folder through
# the data reader, which the tests replace by one that writes the marker.
USER_DATA = ("data_file_factory", "data_module_factory", "data_npz", "data_pt", "data_folder")


def _user_data(root: Path, evil_file: Path) -> dict[str, dict]:
    return {
        "data_file_factory": {"name": f"{evil_file}:factory", "source": "factory"},
        "data_module_factory": {"name": f"{PROBE}:factory", "source": "factory"},
        "data_npz": {"name": str(root / "secret.npz"), "source": "npz"},
        "data_pt": {"name": str(root / "secret.pt"), "source": "pt"},
        "data_folder": {"name": str(root / "images"), "source": "folder"},
    }


# Data entries a file must not get away with: unknown names (rule 3).
BAD_DATA = {
    "name_os": ({"name": "os", "train_subset": 64}, "os"),
    "name_parent_path": ({"name": "../../etc", "train_subset": 64}, "../../etc"),
    "name_factory": ({"name": "os:system"}, "os:system"),
}

TINY = ["--data", "synthetic", "--train-subset", "64", "--width", "8", "--depth", "1"]
TINY += ["--batch-size", "16", "--epochs", "1", "--quiet"]
TINY_CONFIG = dict(
    data="synthetic", train_subset=64, model="mlp", width=8, depth=1, batch_size=16, epochs=1
)
FAST_MEASURE = ["--samples", "32", "--eigs", "0", "--no-trace", "--rho", "0.05"]
FAST_MEASURE += ["--steps", "2", "--quiet"]
FAST_MEASURE_API = dict(samples=32, eigs=0, trace=False, rhos=[0.05], steps=2)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


# -- the files, built once ----------------------------------------------------------------
def _edited(source: Path, target: Path, **changes) -> Path:
    """``target``: the checkpoint ``source`` with top-level entries replaced."""
    ckpt = read_checkpoint(source)
    ckpt.update(changes)
    torch.save(ckpt, target)
    return target


def _edited_run(template: Path, target: Path, config: dict, model: dict | None = None) -> Path:
    """A copy of run folder ``template`` whose resume.pt config has ``config`` on top."""
    shutil.copytree(template, target)
    ckpt = read_checkpoint(template / "resume.pt")
    ckpt["config"] = {**ckpt["config"], **config}
    if model is not None:
        ckpt["model"] = model
    torch.save(ckpt, target / "resume.pt")
    return target


def _fake_cifar10(root: Path, n: int = 8) -> None:
    """A tiny but well-formed cifar-10-batches-py folder (n images per batch file)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    marker = root / "PWNED"
    script = root / "payload_script.py"
    script.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    probe_dir = root / "probe"
    probe_dir.mkdir()
    (probe_dir / f"{PROBE}.py").write_text(PROBE_SOURCE.format(marker=str(marker)))
    evil_file = root / "evil_code.py"  # --model / --data path/to/file.py:factory
    evil_file.write_text(PROBE_SOURCE.format(marker=str(marker)))
    # Data files and a folder that hold real data: still never opened unless named.
    x, y = np.zeros((8, 16), np.float32), np.arange(8) % 4
    np.savez(root / "secret.npz", x_train=x, y_train=y)
    torch.save({"x_train": torch.from_numpy(x), "y_train": torch.from_numpy(y)}, root / "secret.pt")
    (root / "images" / "a").mkdir(parents=True)

    # Two honest runs: sharpscope's mlp, and the factory of this module (named by the user).
    run = root / "run"
    assert main(["train", *TINY, "--model", "mlp", "--out", str(run)]) == 0
    benign_run = root / "benign_run"
    assert main(["train", *TINY, "--model", BENIGN, "--out", str(benign_run)]) == 0
    good = run / "checkpoint.pt"
    payloads = _payloads(marker, script, evil_file)
    hostile = {}
    hostile_runs = {}
    for key, (name, kwargs) in payloads.items():
        spec = {"name": name, "kwargs": kwargs}
        hostile[key] = _edited(good, root / f"{key}.pt", model=spec)
        hostile_runs[key] = _edited_run(run, root / f"run_{key}", {"model": name}, spec)
    bad_data = {
        key: _edited(good, root / f"data_{key}.pt", data=entry)
        for key, (entry, _) in BAD_DATA.items()
    }
    bad_data_runs = {
        key: _edited_run(run, root / f"run_data_{key}", {"data": name})
        for key, (_, name) in BAD_DATA.items()
    }
    user_data = _user_data(root, evil_file)
    user_data_files = {
        key: _edited(good, root / f"user_{key}.pt", data=entry) for key, entry in user_data.items()
    }
    user_data_runs = {
        key: _edited_run(run, root / f"run_user_{key}", {"data": entry["name"]})
        for key, entry in user_data.items()
    }

    # A cifar10 checkpoint (an mlp that fits 3x32x32) whose data entry names a folder
    # and asks for a download; and one naming a folder that holds (fake) CIFAR data.
    spec = model_spec("mlp", (3, 32, 32), 10, width=8, depth=1)
    net = build_model(spec)
    created_by_file = root / "created_by_file" / "cifar"
    planted = root / "planted"
    _fake_cifar10(planted)

    def cifar_checkpoint(path: Path, data_dir: Path) -> Path:
        data = {"name": "cifar10", "train_subset": None, "data_dir": str(data_dir)}
        data["download"] = True
        payload = {"model": spec, "data": data, "config": {"loss": "ce"}, "metrics": {}}
        save_checkpoint(path, {**payload, "state_dict": net.state_dict()})
        return path

    cifar = cifar_checkpoint(root / "cifar.pt", created_by_file)
    cifar_planted = cifar_checkpoint(root / "cifar_planted.pt", planted)
    cifar_config = {"data": "cifar10", "data_dir": str(created_by_file), "download": True}
    cifar_run = _edited_run(run, root / "run_cifar", cifar_config)

    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(probe_dir))
        _EVIL_MARKER[:] = [str(marker)]
        yield types.SimpleNamespace(
            root=root,
            marker=marker,
            payloads=payloads,
            run=run,
            good=good,
            hostile=hostile,
            hostile_runs=hostile_runs,
            benign_run=benign_run,
            benign=benign_run / "checkpoint.pt",
            bad_data=bad_data,
            bad_data_runs=bad_data_runs,
            user_data=user_data,
            user_data_files=user_data_files,
            user_data_runs=user_data_runs,
            cifar=cifar,
            cifar_planted=cifar_planted,
            planted=planted,
            cifar_run=cifar_run,
            created_by_file=created_by_file,
        )
    _EVIL_MARKER.clear()
    sys.modules.pop(PROBE, None)


@pytest.fixture(autouse=True)
def fresh_marker(files, monkeypatch):
    """Each test starts without the marker (an earlier failure must not fail this one);
    the reader of the user's own data writes it whenever it is called."""
    files.marker.unlink(missing_ok=True)
    sys.modules.pop(PROBE, None)
    read = userdata.load_user_data

    def reading(spec):
        files.marker.write_text(f"opened {spec.get('name')}")
        return read(spec)

    monkeypatch.setattr(userdata, "load_user_data", reading)
    yield


@pytest.fixture(autouse=True)
def network(monkeypatch):
    """No test reaches the network: every attempt is recorded here and fails."""
    calls: list = []

    def urlopen(url, *args, **kwargs):
        calls.append(getattr(url, "full_url", url))
        raise OSError("network access attempted in a test")

    def connect(self, address, *args, **kwargs):
        calls.append(address)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return calls


# -- helpers ------------------------------------------------------------------------------
def _tree(*roots: Path) -> set[Path]:
    return {p for root in roots for p in root.rglob("*")}


def _nothing_ran(files) -> None:
    assert not files.marker.exists(), f"a payload ran: {files.marker.read_text()!r}"
    assert PROBE not in sys.modules, "the payload module was imported"
    assert not [m for m in sys.modules if m.startswith("_sharpscope_user_evil_code")]


def _refused(capsys, argv, *says: str) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr, saying ``says``."""
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert code == 2, f"exit {code}, stderr: {err!r}"
    assert "Traceback" not in err, err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    for word in says:
        assert word in err, f"{word!r} not in {err!r}"
    return err


def _succeeds(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, f"exit {code}, stderr: {err!r}"
    return out


# -- 1. a factory named in a file is never imported or called: the CLI ------------------
def _cli_measure(files, ckpt, tmp):
    return ["measure", ckpt, *FAST_MEASURE]


def _cli_measure_after_a_good_one(files, ckpt, tmp):
    return ["measure", files.good, ckpt, *FAST_MEASURE]


def _cli_landscape_1d(files, ckpt, tmp):
    out = tmp / "s.npz"
    return ["landscape", ckpt, "--out", out, "--points", "3", "--samples", "32", "--quiet"]


def _cli_landscape_2d(files, ckpt, tmp):
    return [*_cli_landscape_1d(files, ckpt, tmp), "--dim", "2"]


def _cli_interpolation_to_it(files, ckpt, tmp):
    return ["landscape", files.good, ckpt, "--out", tmp / "i.npz", "--points", "3", "--quiet"]


def _cli_interpolation_from_it(files, ckpt, tmp):
    return ["landscape", ckpt, files.good, "--out", tmp / "i.npz", "--points", "3", "--quiet"]


def _cli_compare_as_b(files, ckpt, tmp):
    return ["compare", files.good, ckpt, "--out", tmp / "cmp", "--quick", "--no-measure", "--quiet"]


def _cli_compare_as_a(files, ckpt, tmp):
    return ["compare", ckpt, files.good, "--out", tmp / "cmp", "--quick", "--no-measure", "--quiet"]


def _cli_compare_as_both(files, ckpt, tmp):
    # Both the same: compare's own "different architectures" check cannot stop it first.
    return ["compare", ckpt, ckpt, "--out", tmp / "cmp", "--quick", "--no-measure", "--quiet"]


CHECKPOINT_COMMANDS = {
    "measure": _cli_measure,
    "measure_second": _cli_measure_after_a_good_one,
    "landscape_1d": _cli_landscape_1d,
    "landscape_2d": _cli_landscape_2d,
    "interpolation_to_it": _cli_interpolation_to_it,
    "interpolation_from_it": _cli_interpolation_from_it,
    "compare_as_b": _cli_compare_as_b,
    "compare_as_a": _cli_compare_as_a,
    "compare_as_both": _cli_compare_as_both,
}


@pytest.mark.parametrize("command", CHECKPOINT_COMMANDS)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_factory_named_in_a_checkpoint_is_never_imported_by_the_cli(
    files, capsys, tmp_path, network, payload, command
):
    name = files.payloads[payload][0]
    argv = CHECKPOINT_COMMANDS[command](files, files.hostile[payload], tmp_path)
    before = _tree(tmp_path, files.root)
    _refused(capsys, argv, name, f"--model {name}")
    _nothing_ran(files)
    assert _tree(tmp_path, files.root) == before, "a refused command created files"
    assert network == []


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("with_options", [False, True], ids=["bare", "whole_command_line"])
def test_a_factory_named_in_a_resume_point_is_never_imported_by_train_resume(
    files, capsys, tmp_path, network, payload, with_options
):
    # The resume point's config names the factory; the user names none (bare), or
    # reruns the run's own command line, which names the registry mlp.
    name = files.payloads[payload][0]
    run = shutil.copytree(files.hostile_runs[payload], tmp_path / "run")
    argv = ["train", "--out", run, "--resume", "--quiet"]
    if with_options:
        argv += [*TINY, "--model", "mlp"]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    _refused(capsys, argv, name, f"--model {name}")
    _nothing_ran(files)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert network == []


def test_naming_one_factory_does_not_trust_the_one_a_file_names(files, capsys, tmp_path):
    evil = files.hostile["factory_in_test_module"]
    # The user's --model is built instead (its weights do not fit): the file's never runs.
    _refused(capsys, ["measure", evil, "--model", BENIGN, *FAST_MEASURE])
    _refused(capsys, ["measure", evil, "--model", "mlp", *FAST_MEASURE])
    # Naming the factory of one checkpoint does not trust another's (--model is then the
    # architecture of both, and the second's weights do not fit it).
    _refused(capsys, ["measure", files.benign, evil, "--model", BENIGN, *FAST_MEASURE])
    probe = files.hostile["module_that_runs_on_import"]
    _refused(capsys, ["measure", files.benign, probe, "--model", BENIGN, *FAST_MEASURE])
    kwargs = dict(model=BENIGN, **FAST_MEASURE_API)
    for path in (evil, probe):
        with pytest.raises(SharpscopeError, match="weights do not fit"):
            measure_checkpoint(str(path), **kwargs)
    run = shutil.copytree(files.hostile_runs["factory_in_test_module"], tmp_path / "run")
    _refused(capsys, ["train", "--out", run, "--resume", "--model", BENIGN, "--quiet"], EVIL)
    _nothing_ran(files)


def test_the_refusal_names_the_factory_and_how_to_allow_it(files, capsys):
    err = _refused(capsys, ["measure", files.benign, *FAST_MEASURE])
    assert err.startswith("sharpscope measure: error: ")
    assert repr(BENIGN) in err and f"--model {BENIGN}" in err and "trust_code=True" in err
    with pytest.raises(SharpscopeError) as caught:
        load_checkpoint(files.hostile["os_system"])
    message = str(caught.value)
    assert "'os:system'" in message and "--model os:system" in message
    assert "trust_code" in message and "\n" not in message
    _nothing_ran(files)


# -- positive controls: the user names the factory ----------------------------------------
def test_a_factory_the_user_names_is_built_by_measure_and_landscape(files, capsys, tmp_path):
    _refused(capsys, ["measure", files.benign, *FAST_MEASURE], BENIGN, "--model")
    out = _succeeds(capsys, ["measure", files.benign, "--model", BENIGN, *FAST_MEASURE])
    assert "checkpoint.pt" in out
    surface = tmp_path / "s.npz"
    _refused(capsys, _cli_landscape_1d(files, files.benign, tmp_path), BENIGN)
    assert not surface.exists()
    _succeeds(capsys, [*_cli_landscape_1d(files, files.benign, tmp_path), "--model", BENIGN])
    assert surface.is_file()
    interp = ["landscape", files.benign, files.benign, "--out", tmp_path / "i.npz"]
    interp += ["--points", "3", "--samples", "32", "--quiet"]
    _refused(capsys, interp, BENIGN)
    _succeeds(capsys, [*interp, "--model", BENIGN])
    assert (tmp_path / "i.npz").is_file()
    _nothing_ran(files)


def test_a_factory_the_user_names_is_built_by_compare(files, capsys, tmp_path):
    argv = ["compare", files.benign, files.benign, "--out", tmp_path / "cmp", "--no-measure"]
    argv += ["--points", "3", "--points-2d", "3", "--samples", "32", "--quiet"]
    _refused(capsys, argv, BENIGN, "--model")
    assert not (tmp_path / "cmp").exists()
    _succeeds(capsys, [*argv, "--model", BENIGN])
    assert (tmp_path / "cmp" / "report.md").is_file()


def test_a_factory_the_user_names_resumes_its_run(files, capsys, tmp_path):
    run = shutil.copytree(files.benign_run, tmp_path / "run")
    _refused(capsys, ["train", "--out", run, "--resume", "--quiet"], BENIGN, f"--model {BENIGN}")
    _succeeds(capsys, ["train", "--out", run, "--resume", "--model", BENIGN, "--quiet"])
    config = load_run_config(str(run), model=BENIGN)
    assert train(config, str(run), resume=True, quiet=True)["step"] == 4


def test_a_factory_the_user_names_is_built_by_the_api(files):
    with pytest.raises(SharpscopeError, match="--model"):
        load_checkpoint(files.benign)
    with pytest.raises(SharpscopeError, match="--model"):
        load_checkpoint(files.benign, trust_code=False)
    x = torch.randn(3, 16)
    by_name, meta = load_checkpoint(files.benign, model=BENIGN)
    trusted, _ = load_checkpoint(files.benign, trust_code=True)
    assert isinstance(by_name, Benign) and isinstance(trusted, Benign)
    assert meta["model"]["name"] == BENIGN
    torch.testing.assert_close(by_name(x), trusted(x), rtol=0, atol=0)
    net, dataset, _ = load_model_and_data(str(files.benign), model=BENIGN)
    assert isinstance(net, Benign) and dataset.name == "synthetic"
    doc = measure_checkpoint(str(files.benign), model=BENIGN, **FAST_MEASURE_API)
    assert doc["model"]["name"] == BENIGN
    doc = measure_checkpoint(str(files.benign), trust_code=True, **FAST_MEASURE_API)
    assert doc["model"]["name"] == BENIGN
    with pytest.raises(SharpscopeError, match="--model"):
        load_run_config(str(files.benign_run))
    assert load_run_config(str(files.benign_run), model=BENIGN).model == BENIGN
    assert load_run_config(str(files.benign_run), trust_code=True).model == BENIGN
    _nothing_ran(files)


# -- 1. the API ------------------------------------------------------------------------------
def _api_load_checkpoint(files, ckpt, run, tmp):
    load_checkpoint(ckpt)


def _api_load_checkpoint_naming_another_factory(files, ckpt, run, tmp):
    load_checkpoint(ckpt, model=BENIGN)  # trusts benign, not what the file names


def _api_load_model_and_data(files, ckpt, run, tmp):
    load_model_and_data(str(ckpt))


def _api_measure_checkpoint(files, ckpt, run, tmp):
    measure_checkpoint(str(ckpt), **FAST_MEASURE_API)


def _api_landscape_1d(files, ckpt, run, tmp):
    landscape_for_checkpoint(str(ckpt), points=3, samples=32)


def _api_landscape_2d(files, ckpt, run, tmp):
    landscape_for_checkpoint(str(ckpt), dim=2, points=3, samples=32)


def _api_interpolation(files, ckpt, run, tmp):
    interpolation_for_checkpoints(str(files.good), str(ckpt), points=3, samples=32)


def _api_compare(files, ckpt, run, tmp):
    kwargs = dict(points=3, points_2d=3, samples=32, measure=False)
    compare_checkpoints(str(ckpt), str(ckpt), str(tmp / "cmp"), **kwargs)


def _api_load_run_config(files, ckpt, run, tmp):
    load_run_config(str(run))


def _api_train_resume(files, ckpt, run, tmp):
    train(TrainConfig(**TINY_CONFIG), str(run), resume=True, quiet=True)


API_ENTRIES = {
    "load_checkpoint": _api_load_checkpoint,
    "load_checkpoint_naming_another_factory": _api_load_checkpoint_naming_another_factory,
    "load_model_and_data": _api_load_model_and_data,
    "measure_checkpoint": _api_measure_checkpoint,
    "landscape_1d": _api_landscape_1d,
    "landscape_2d": _api_landscape_2d,
    "interpolation": _api_interpolation,
    "compare": _api_compare,
    "load_run_config": _api_load_run_config,
    "train_resume": _api_train_resume,
}


@pytest.mark.parametrize("entry", API_ENTRIES)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_a_factory_named_in_a_file_is_never_imported_by_the_api(
    files, tmp_path, network, payload, entry
):
    run = shutil.copytree(files.hostile_runs[payload], tmp_path / "run")
    before = _tree(tmp_path, files.root)
    with pytest.raises(SharpscopeError):
        API_ENTRIES[entry](files, files.hostile[payload], run, tmp_path)
    _nothing_ran(files)
    assert _tree(tmp_path, files.root) == before, "a refused call created files"
    assert network == []


# -- 2. data folders and downloads come from the user only -----------------------------------
CIFAR_COMMANDS = {
    "measure": lambda f, t: ["measure", f.cifar, *FAST_MEASURE],
    "landscape_1d": lambda f, t: ["landscape", f.cifar, "--out", t / "s.npz", "--points", "3"],
    "landscape_2d": lambda f, t: ["landscape", f.cifar, "--out", t / "s.npz", "--dim", "2"],
    "interpolation": lambda f, t: ["landscape", f.cifar, f.cifar, "--out", t / "i.npz"],
    "compare": lambda f, t: ["compare", f.cifar, f.cifar, "--out", t / "c", "--quick", "--quiet"],
}


@pytest.mark.parametrize("command", CIFAR_COMMANDS)
def test_a_data_folder_named_in_a_checkpoint_is_never_created_or_downloaded_into(
    files, capsys, tmp_path, network, command
):
    before = _tree(tmp_path, files.root)
    _refused(capsys, CIFAR_COMMANDS[command](files, tmp_path), "cifar10", "--data-dir")
    assert not files.created_by_file.parent.exists()
    assert network == []
    assert _tree(tmp_path, files.root) == before, "a refused command created files"


def test_a_data_folder_named_in_a_checkpoint_is_never_read(files, capsys, tmp_path):
    # The file points at a folder that does hold CIFAR data: it is still not used.
    _refused(capsys, ["measure", files.cifar_planted, *FAST_MEASURE], "--data-dir")
    landscape = ["landscape", files.cifar_planted, "--out", tmp_path / "s.npz", "--points", "3"]
    _refused(capsys, landscape, "--data-dir")
    # The control: the same folder, named by the user, is read.
    argv = ["measure", files.cifar_planted, "--data-dir", files.planted, *FAST_MEASURE]
    assert "cifar_planted.pt" in _succeeds(capsys, argv)


def test_only_the_users_download_flag_downloads_and_into_the_users_folder(
    files, capsys, tmp_path, network
):
    mine = tmp_path / "mine"
    mine.mkdir()
    # The file says download=True; the user's folder lacks the data: no download.
    _refused(capsys, ["measure", files.cifar, "--data-dir", mine, *FAST_MEASURE], "--download")
    assert network == [] and list(mine.iterdir()) == []
    # With --download the user's folder is fetched into (the network is off here).
    argv = ["measure", files.cifar, "--data-dir", mine, "--download", *FAST_MEASURE]
    _refused(capsys, argv, "could not download")
    assert network == [CIFAR10_URL]
    assert list(mine.iterdir()) == []  # the partial download was removed
    assert not files.created_by_file.parent.exists()


def test_the_api_ignores_a_files_data_folder_and_download_flag(files, tmp_path, network):
    _, meta = load_checkpoint(files.cifar)
    assert meta["data"] == {
        "name": "cifar10",
        "train_subset": None,
        "data_dir": None,
        "download": False,
    }
    _, meta = load_checkpoint(files.cifar, data_dir=str(tmp_path))
    assert meta["data"]["data_dir"] == str(tmp_path) and meta["data"]["download"] is False
    calls = [
        lambda: load_model_and_data(str(files.cifar)),
        lambda: load_model_and_data(str(files.cifar_planted)),
        lambda: measure_checkpoint(str(files.cifar), **FAST_MEASURE_API),
        lambda: landscape_for_checkpoint(str(files.cifar), points=3, samples=32),
        lambda: interpolation_for_checkpoints(str(files.cifar), str(files.cifar), points=3),
        lambda: compare_checkpoints(
            str(files.cifar), str(files.cifar), str(tmp_path / "c"), measure=False
        ),
    ]
    for call in calls:
        with pytest.raises(SharpscopeError, match="--data-dir"):
            call()
    assert not files.created_by_file.parent.exists()
    assert not (tmp_path / "c").exists()
    assert network == []


def test_a_resume_points_data_folder_and_download_flag_are_ignored(
    files, capsys, tmp_path, network
):
    run = shutil.copytree(files.cifar_run, tmp_path / "run")
    _refused(capsys, ["train", "--out", run, "--resume", "--quiet"], "cifar10", "--data-dir")
    config = load_run_config(str(run))
    assert config.data == "cifar10" and config.data_dir is None and config.download is False
    with pytest.raises(SharpscopeError, match="--data-dir"):
        train(config, str(run), resume=True, quiet=True)
    assert not files.created_by_file.parent.exists()
    assert network == []


# -- 3. unknown data sets in a file are refused ----------------------------------------------
BAD_DATA_COMMANDS = {
    "measure": lambda f, c, t: ["measure", c, *FAST_MEASURE],
    "landscape": lambda f, c, t: ["landscape", c, "--out", t / "s.npz", "--points", "3"],
    "interpolation": lambda f, c, t: ["landscape", f.good, c, "--out", t / "i.npz"],
    "compare": lambda f, c, t: ["compare", f.good, c, "--out", t / "c", "--quick", "--quiet"],
}


@pytest.mark.parametrize("command", BAD_DATA_COMMANDS)
@pytest.mark.parametrize("data", BAD_DATA)
def test_an_unknown_data_set_named_in_a_checkpoint_is_refused(
    files, capsys, tmp_path, network, data, command
):
    name = BAD_DATA[data][1]
    before = _tree(tmp_path, files.root)
    argv = BAD_DATA_COMMANDS[command](files, files.bad_data[data], tmp_path)
    _refused(capsys, argv, "unknown data set", repr(name))
    with pytest.raises(SharpscopeError, match="unknown data set"):
        load_checkpoint(files.bad_data[data])
    assert _tree(tmp_path, files.root) == before
    assert network == []


@pytest.mark.parametrize("data", BAD_DATA)
def test_an_unknown_data_set_named_in_a_resume_point_is_refused(files, capsys, tmp_path, data):
    name = BAD_DATA[data][1]
    run = shutil.copytree(files.bad_data_runs[data], tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    _refused(capsys, ["train", "--out", run, "--resume", "--quiet"], repr(name))
    with pytest.raises(SharpscopeError, match="data"):
        train(load_run_config(str(run)), str(run), resume=True, quiet=True)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# -- 3. the user's own data a file names is opened only when the user names data -----------
def _named(files, key: str) -> str:
    return files.user_data[key]["name"]


@pytest.mark.parametrize("command", BAD_DATA_COMMANDS)
@pytest.mark.parametrize("data", USER_DATA)
def test_the_users_own_data_named_in_a_checkpoint_is_never_opened(
    files, capsys, tmp_path, network, data, command
):
    name = _named(files, data)
    before = _tree(tmp_path, files.root)
    argv = BAD_DATA_COMMANDS[command](files, files.user_data_files[data], tmp_path)
    _refused(capsys, argv, repr(name), f"--data {name}")
    _nothing_ran(files)
    assert _tree(tmp_path, files.root) == before, "a refused command created files"
    assert network == []


API_DATA_ENTRIES = {
    "load_checkpoint": lambda f, c, t: load_checkpoint(c),
    "load_model_and_data": lambda f, c, t: load_model_and_data(str(c)),
    "measure_checkpoint": lambda f, c, t: measure_checkpoint(str(c), **FAST_MEASURE_API),
    "landscape_1d": lambda f, c, t: landscape_for_checkpoint(str(c), points=3, samples=32),
    "interpolation": lambda f, c, t: interpolation_for_checkpoints(str(f.good), str(c), points=3),
    "compare": lambda f, c, t: compare_checkpoints(
        str(c), str(c), str(t / "cmp"), points=3, points_2d=3, samples=32, measure=False
    ),
}


@pytest.mark.parametrize("entry", API_DATA_ENTRIES)
@pytest.mark.parametrize("data", USER_DATA)
def test_the_users_own_data_named_in_a_checkpoint_is_never_opened_by_the_api(
    files, tmp_path, data, entry
):
    before = _tree(tmp_path, files.root)
    with pytest.raises(SharpscopeError, match="--data"):
        API_DATA_ENTRIES[entry](files, files.user_data_files[data], tmp_path)
    _nothing_ran(files)
    assert _tree(tmp_path, files.root) == before


@pytest.mark.parametrize("data", USER_DATA)
@pytest.mark.parametrize("with_options", [False, True], ids=["bare", "whole_command_line"])
def test_the_users_own_data_named_in_a_resume_point_is_never_opened(
    files, capsys, tmp_path, data, with_options
):
    # The resume point names the data; the user names none (bare), or reruns a command
    # line naming the registry's synthetic data (then the options differ: refused).
    name = _named(files, data)
    run = shutil.copytree(files.user_data_runs[data], tmp_path / "run")
    argv = ["train", "--out", run, "--resume", "--quiet"]
    if with_options:
        argv += [*TINY, "--model", "mlp"]
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    _refused(capsys, argv, repr(name), "--data")
    with pytest.raises(SharpscopeError, match="--data"):
        load_run_config(str(run))
    _nothing_ran(files)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_data_the_user_names_replaces_the_files_and_trust_code_opens_it(files, capsys):
    # Naming data (any: here the registry's) replaces the file's, which is never opened.
    for data in USER_DATA:
        ckpt = files.user_data_files[data]
        out = _succeeds(capsys, ["measure", ckpt, "--data", "synthetic", *FAST_MEASURE])
        assert ckpt.name in out
        _nothing_ran(files)
    # Naming the file itself opens it; so does trust_code=True in Python.
    secret = _named(files, "data_npz")
    _succeeds(
        capsys, ["measure", files.user_data_files["data_npz"], "--data", secret, *FAST_MEASURE]
    )
    assert files.marker.read_text() == f"opened {secret}"
    files.marker.unlink()
    _, dataset, meta = load_model_and_data(str(files.user_data_files["data_pt"]), trust_code=True)
    assert meta["data"]["source"] == "pt" and len(dataset.train_y) == 6  # 2 held out for test
