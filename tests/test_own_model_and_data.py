"""The user's own model and data on the command line and in Python: ``--model
file.py:factory`` / ``module:factory`` with ``--model-kwargs``, ``--data`` a .npz or .pt
file, an image folder or a factory; what a checkpoint records of them and what must be
named again; every bad input in one line with exit code 2 and no file left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sharpscope.checkpoint import load_checkpoint, load_model_and_data, read_checkpoint
from sharpscope.cli import main
from sharpscope.data import load_dataset
from sharpscope.errors import SharpscopeError, SharpscopeWarning
from sharpscope.models import build_model, model_spec
from sharpscope.train import load_run_config, train
from sharpscope.train_config import TrainConfig
from sharpscope.usercode import same_factory
from tests.cli_utils import exit2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL_SOURCE = """\
import math

from torch import nn


def make(input_shape, num_classes, width=4):
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), width),
        nn.Tanh(),
        nn.Linear(width, num_classes),
    )


def flat(width=4, **kwargs):  # torchvision's way: num_classes through **kwargs
    return nn.Sequential(nn.Flatten(), nn.Linear(6, width), nn.Linear(width, kwargs["num_classes"]))


def no_classes(width=3):
    return nn.Sequential(nn.Flatten(), nn.Linear(6, width), nn.Linear(width, 3))


def raises(input_shape, num_classes):
    return {}["no such key"]


def not_a_module():
    return 42


not_callable = 3
"""

FAST_MEASURE = ["--samples", "32", "--eigs", "1", "--no-trace", "--steps", "2", "--quiet"]


def _rng_arrays(n: int = 60, dim: int = 6, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = (np.abs(x[:, 0]) * classes / 3).astype(np.int64) % classes
    return x, y


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A working folder with mymodel.py, mydata.npz (classification, with a test split)
    and reg.npz (regression, no test split)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodel.py").write_text(MODEL_SOURCE)
    x, y = _rng_arrays()
    np.savez(tmp_path / "mydata.npz", x_train=x[:48], y_train=y[:48], x_test=x[48:], y_test=y[48:])
    np.savez(tmp_path / "reg.npz", x_train=x, y_train=(2 * x[:, 0] - x[:, 1]).astype(np.float32))
    return tmp_path


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if "__pycache__" not in p.parts}


# -- models -----------------------------------------------------------------------------------
def test_a_model_file_by_path_and_the_keywords_its_factory_gets(folder):
    spec = model_spec("mymodel.py:make", (6,), 3, width=8)
    assert spec == {
        "name": "mymodel.py:make",
        "kwargs": {"input_shape": [6], "num_classes": 3, "width": 8},
    }
    assert build_model(spec)(torch.randn(2, 6)).shape == (2, 3)
    # **kwargs gets num_classes (as torchvision and timm take it), never input_shape.
    assert model_spec("mymodel.py:flat", (6,), 3)["kwargs"] == {"num_classes": 3}
    assert model_spec("mymodel.py:no_classes", (6,), 3)["kwargs"] == {}
    # None leaves a keyword out; a keyword the factory does not take is refused.
    assert model_spec("mymodel.py:flat", (6,), 3, num_classes=None)["kwargs"] == {}
    with pytest.raises(SharpscopeError, match="does not take the keyword 'depthh'"):
        model_spec("mymodel.py:make", (6,), 3, depthh=2)
    # The same file loads once (one class for isinstance), under a name of its own.
    a = build_model(model_spec("mymodel.py:make", (6,), 3))
    b = build_model(model_spec(str(folder / "mymodel.py") + ":make", (6,), 3))
    assert type(a[1]) is type(b[1]) and "mymodel" not in sys.modules


def test_two_model_files_of_one_name_are_two_modules(tmp_path, monkeypatch):
    for sub, width in (("a", 2), ("b", 5)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "net.py").write_text(
            f"from torch import nn\ndef make(num_classes):\n    return nn.Linear(3, {width})\n"
        )
    monkeypatch.chdir(tmp_path)
    widths = [build_model(model_spec(f"{s}/net.py:make", (3,), 2)).out_features for s in "ab"]
    assert widths == [2, 5]
    assert same_factory("a/net.py:make", "b/net.py:make")  # one file name: the user's runs
    assert not same_factory("a/net.py:make", "a/net.py:other")
    assert not same_factory("net:make", "other/net:make")


def test_a_module_factory_is_imported_from_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "cwd_models_xyz.py").write_text(
        "from torch import nn\ndef make(num_classes, hidden=3):\n    return nn.Linear(4, 3)\n"
    )
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    try:
        spec = model_spec("cwd_models_xyz:make", (4,), 3, hidden=5)
        assert spec["kwargs"] == {"num_classes": 3, "hidden": 5}
        assert sys.path == path_before  # the working folder only for the import
    finally:
        sys.modules.pop("cwd_models_xyz", None)


def test_torchvision_by_name():
    pytest.importorskip("torchvision")
    spec = model_spec("torchvision.models:resnet18", (3, 32, 32), 10)
    assert spec["kwargs"] == {"num_classes": 10}
    assert build_model(spec)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_timm_by_name():
    pytest.importorskip("timm")
    options = {"model_name": "vit_tiny_patch16_224", "img_size": 32}
    spec = model_spec("timm:create_model", (3, 32, 32), 10, **options)
    assert spec["kwargs"] == {"num_classes": 10, **options}
    assert build_model(spec)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


BAD_MODELS = {
    "missing file": ("nowhere.py:make", "nowhere.py: no such file"),
    "a folder": ("sub.py:make", "a folder, not a Python file"),
    "raises on import": ("broken.py:make", "ZeroDivisionError: division by zero (at broken.py"),
    "syntax error": ("syntax.py:make", "SyntaxError"),
    "exits on import": ("script.py:make", "sys.exit(3)"),
    "not callable": ("mymodel.py:not_callable", "no callable 'not_callable'"),
    "no such factory": ("mymodel.py:nothing", "no callable 'nothing'"),
    "not a module": ("mymodel.py:not_a_module", "did not return a torch.nn.Module"),
    "factory raises": ("mymodel.py:raises", "KeyError: 'no such key' (at mymodel.py line"),
    "no such module": ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
    "not a name": ("mymodel.py", "unknown model"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_a_bad_model_is_one_line_and_leaves_nothing(folder, capsys, case):
    (folder / "broken.py").write_text("import torch\n\nx = 1 / 0\n")
    (folder / "syntax.py").write_text("def make(:\n")
    (folder / "script.py").write_text("import sys\nsys.exit(3)\n")
    (folder / "sub.py").mkdir()
    name, message = BAD_MODELS[case]
    before = _files(folder)
    argv = ["train", "--model", name, "--data", "mydata.npz", "--epochs", "1", "--out", "run"]
    assert message in exit2(argv, capsys)
    assert _files(folder) == before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ("[1, 2]", "expected a JSON object"),
        ("{width: 8}", "not JSON"),
        ('"width"', "expected a JSON object"),
    ],
)
def test_model_kwargs_must_be_a_json_object(folder, capsys, kwargs, message):
    argv = ["train", "--model", "mymodel.py:make", "--data", "mydata.npz", "--out", "run"]
    assert message in exit2([*argv, "--model-kwargs", kwargs], capsys)
    argv = ["measure", "ckpt.pt", "--model", "mymodel.py:make", "--model-kwargs", kwargs]
    assert message in exit2(argv, capsys)
    assert not (folder / "run").exists()


def test_a_keyword_given_twice_or_not_taken_is_refused(folder, capsys):
    argv = ["train", "--model", "mlp", "--data", "mydata.npz", "--out", "run", "--width", "4"]
    assert "give it once" in exit2([*argv, "--model-kwargs", '{"width": 8}'], capsys)
    argv = ["train", "--model", "mymodel.py:make", "--data", "mydata.npz", "--out", "run"]
    assert "'colour'" in exit2([*argv, "--model-kwargs", '{"colour": 1}'], capsys)
    # A model that cannot take the data (6 inputs for 5 features): one line, before the run.
    np.savez("five.npz", x_train=np.zeros((40, 5), np.float32), y_train=np.arange(40) % 3)
    argv = ["train", "--model", "mymodel.py:no_classes", "--data", "five.npz", "--out", "run"]
    assert "cannot be evaluated" in exit2([*argv, "--model-kwargs", '{"width": 2}'], capsys)
    assert not (folder / "run").exists()


# -- data -------------------------------------------------------------------------------------
def test_a_npz_with_a_test_split(folder):
    ds = load_dataset("mydata.npz")
    x, y = _rng_arrays()
    assert ds.train_x.shape == (48, 6) and ds.test_x.shape == (12, 6)
    assert torch.equal(ds.test_y, torch.from_numpy(y[48:])) and ds.train_x.dtype == torch.float32
    assert ds.num_classes == int(y.max()) + 1 and ds.task == "classification"
    assert ds.spec["source"] == "npz" and ds.spec["held_out_test"] is False
    assert ds.spec["bytes"] == os.path.getsize("mydata.npz") and len(ds.spec["sha256"]) == 64


def test_without_a_test_split_a_fixed_fifth_is_held_out(folder):
    x, y = _rng_arrays()
    np.savez("all.npz", x_train=x, y_train=y, num_classes=np.array(7))
    ds = load_dataset("all.npz")
    assert len(ds.train_y) == 48 and len(ds.test_y) == 12 and ds.num_classes == 7
    again = load_dataset("all.npz")
    assert torch.equal(ds.test_x, again.test_x) and ds.spec["held_out_test"] is True
    rows = {tuple(r) for r in torch.cat([ds.train_x, ds.test_x]).tolist()}
    assert rows == {tuple(r) for r in torch.from_numpy(x).tolist()}


def test_a_pt_file_and_regression_targets(folder):
    x, _ = _rng_arrays()
    target = torch.from_numpy(x[:, :2] * 3).double()
    torch.save({"x_train": torch.from_numpy(x), "y_train": target}, "reg2.pt")
    ds = load_dataset("reg2.pt")
    assert ds.task == "regression" and ds.num_classes == 2 and ds.train_y.dtype == torch.float32
    assert ds.spec["source"] == "pt"
    scalar = load_dataset("reg.npz")
    assert scalar.task == "regression" and scalar.num_classes == 1 and scalar.train_y.dim() == 1
    # Integer inputs (token ids) stay integers; one feature per example becomes a column.
    np.savez("tokens.npz", x_train=np.arange(10).reshape(5, 2), y_train=np.arange(5) % 2)
    assert load_dataset("tokens.npz").train_x.dtype == torch.int64
    np.savez("column.npz", x_train=np.arange(5.0), y_train=np.arange(5) % 2)
    assert load_dataset("column.npz").input_shape == (1,)


def _write(name: str, **arrays) -> str:
    np.savez(name, **arrays)
    return name


BAD_DATA = {
    "missing file": (lambda: "nothing.npz", "nothing.npz: no such file"),
    "unknown name": (lambda: "imagenet", "unknown data set 'imagenet'"),
    "not a zip": (lambda: Path("text.npz").write_text("x") and "text.npz", "not a .npz"),
    "no x_train": (lambda: _write("a.npz", y_train=np.zeros(3, int)), "no x_train"),
    "lengths differ": (
        lambda: _write("a.npz", x_train=np.zeros((3, 2)), y_train=np.zeros(4, int)),
        "3 inputs but 4 targets",
    ),
    "NaN inputs": (
        lambda: _write("a.npz", x_train=np.full((3, 2), np.nan), y_train=np.zeros(3, int)),
        "NaN or infinite",
    ),
    "object arrays": (
        lambda: Path("a.npz").write_bytes(_object_npz()) and "a.npz",
        "Python objects",
    ),
    "text labels": (
        lambda: _write("a.npz", x_train=np.zeros((2, 2)), y_train=np.array(["a", "b"])),
        "holds text",
    ),
    "unknown entry": (
        lambda: _write("a.npz", x_train=np.zeros((2, 2)), y_train=np.zeros(2, int), x_tset=0),
        "unknown entries 'x_tset'",
    ),
    "x_test alone": (
        lambda: _write(
            "a.npz", x_train=np.zeros((2, 2)), y_train=np.zeros(2, int), x_test=np.zeros((1, 2))
        ),
        "give both or neither",
    ),
    "negative labels": (
        lambda: _write("a.npz", x_train=np.zeros((2, 2)), y_train=np.array([0, -1])),
        "outside 0 ..",
    ),
    "too few classes": (
        lambda: _write(
            "a.npz", x_train=np.zeros((2, 2)), y_train=np.array([0, 5]), num_classes=np.array(3)
        ),
        "num_classes is 3",
    ),
    "test of another shape": (
        lambda: _write(
            "a.npz",
            x_train=np.zeros((2, 2)),
            y_train=np.zeros(2, int),
            x_test=np.zeros((2, 3)),
            y_test=np.zeros(2, int),
        ),
        "x_test is float32 of shape (2, 3)",
    ),
    "bool labels": (
        lambda: _write("a.npz", x_train=np.zeros((2, 2)), y_train=np.array([True, False])),
        "booleans",
    ),
    "a pickle in a .pt": (
        lambda: torch.save({"x_train": object()}, "a.pt") or "a.pt",
        "arbitrary unpickling",
    ),
    "a list in a .pt": (lambda: torch.save([1, 2], "a.pt") or "a.pt", "not a dict of tensors"),
    "a csv file": (lambda: Path("a.csv").write_text("1,2") and "a.csv", "not a data file"),
}


def _object_npz() -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, x_train=np.array([{"a": 1}, None], dtype=object), y_train=np.zeros(2, int))
    return buffer.getvalue()


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_line_and_leaves_nothing(folder, capsys, case):
    make, message = BAD_DATA[case]
    name = make()
    before = _files(folder)
    argv = ["train", "--model", "mlp", "--data", name, "--epochs", "1", "--out", "run"]
    assert message in exit2(argv, capsys)
    with pytest.raises(SharpscopeError):
        load_dataset(name)
    assert _files(folder) == before


def test_sizes_are_checked_before_reading(folder, monkeypatch):
    import sharpscope.userdata as userdata

    monkeypatch.setattr(userdata, "MAX_DATA_BYTES", 1000)
    np.savez("big.npz", x_train=np.zeros((100, 2), np.float32), y_train=np.zeros(100, np.int64))
    np.savez_compressed(
        "bomb.npz", x_train=np.zeros((10**5, 10)), y_train=np.zeros(10**5, np.int64)
    )
    calls = []
    monkeypatch.setattr(
        userdata.np.lib.npyio.NpzFile, "__getitem__", lambda self, k: calls.append(k)
    )
    for name in ("big.npz", "bomb.npz"):
        with pytest.raises(SharpscopeError, match="more than"):
            load_dataset(name)
    assert calls == []  # refused from the headers
    with zipfile.ZipFile("zipped.pt", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * 100)
    with pytest.raises(SharpscopeError, match="compressed"):
        load_dataset("zipped.pt")


def test_the_loss_must_fit_the_targets(folder, capsys):
    argv = ["train", "--model", "mlp", "--data", "reg.npz", "--epochs", "1", "--out", "run"]
    err = exit2(argv, capsys)
    assert "real-valued targets" in err and "--loss mse" in err
    assert not (folder / "run").exists()


# -- data factories ---------------------------------------------------------------------------
DATA_FACTORIES = """\
import torch
from torch.utils.data import TensorDataset

from sharpscope.data import Dataset

g = torch.Generator().manual_seed(0)
X, Y = torch.randn(40, 5, generator=g), torch.randint(0, 4, (40,), generator=g)


def dataset():
    return Dataset("mine", X[:30], Y[:30], X[30:], Y[30:], 4)


def tensors():
    return {"x_train": X, "y_train": Y, "num_classes": 6}


def pair():
    return TensorDataset(X[:30], Y[:30]), [(x, int(y)) for x, y in zip(X[30:], Y[30:])]


def one():
    return TensorDataset(X, Y)


def odd_shapes():
    return [(torch.zeros(3), 0), (torch.zeros(4), 1)]


def not_pairs():
    return [torch.zeros(3), torch.zeros(3), torch.zeros(3)]


class Failing(torch.utils.data.Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        if i == 2:
            raise ValueError("corrupt example")
        return torch.zeros(2), 0


def failing():
    return Failing()


def a_string():
    return "data"
"""


def test_a_data_factory_may_return_any_usual_form(folder):
    (folder / "mydatasets.py").write_text(DATA_FACTORIES)
    ds = load_dataset("mydatasets.py:dataset")
    assert (len(ds.train_y), len(ds.test_y), ds.num_classes) == (30, 10, 4)
    assert ds.name == "mydatasets.py:dataset" and len(ds.spec["tensors_sha256"]) == 64
    assert load_dataset("mydatasets.py:tensors").num_classes == 6
    pair = load_dataset("mydatasets.py:pair")
    assert torch.equal(pair.train_x, ds.train_x) and torch.equal(pair.test_y, ds.test_y)
    assert pair.spec["tensors_sha256"] == ds.spec["tensors_sha256"]  # the same tensors
    one = load_dataset("mydatasets.py:one")
    assert (len(one.train_y), len(one.test_y)) == (32, 8)


@pytest.mark.parametrize(
    "factory, message",
    [
        ("odd_shapes", "items of different shapes"),
        ("not_pairs", "not an (x, y) pair"),
        ("failing", "item 2 failed: ValueError: corrupt example (at mydatasets.py line"),
        ("a_string", "returned a str"),
        ("nothing", "no callable 'nothing'"),
    ],
)
def test_a_bad_data_factory_is_one_line(folder, capsys, factory, message):
    (folder / "mydatasets.py").write_text(DATA_FACTORIES)
    argv = ["train", "--data", f"mydatasets.py:{factory}", "--epochs", "1", "--out", "run"]
    assert message in exit2(argv, capsys)
    assert not (folder / "run").exists()


# -- image folders ----------------------------------------------------------------------------
def _fake_torchvision(monkeypatch):
    """A stand-in for torchvision's ImageFolder and ToTensor (torchvision does not
    import beside every torch build): the same layout rules, read with Pillow."""
    from PIL import Image

    class ToTensor:
        def __call__(self, image):
            array = np.asarray(image, dtype=np.float32) / 255
            return torch.from_numpy(array).permute(2, 0, 1)

    class ImageFolder:
        def __init__(self, root, transform=None):
            self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
            if not self.classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {root}.")
            self.samples = [
                (os.path.join(root, c, f), i)
                for i, c in enumerate(self.classes)
                for f in sorted(os.listdir(os.path.join(root, c)))
            ]
            self.transform = transform

        def __len__(self):
            return len(self.samples)

        def __getitem__(self, i):
            path, target = self.samples[i]
            return self.transform(Image.open(path).convert("RGB")), target

    tv = types.ModuleType("torchvision")
    tv.datasets = types.SimpleNamespace(ImageFolder=ImageFolder)
    tv.transforms = types.SimpleNamespace(ToTensor=ToTensor)
    monkeypatch.setitem(sys.modules, "torchvision", tv)


def _images(root: Path, classes: dict[str, int], size=(5, 4)) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_an_image_folder(folder, monkeypatch):
    _images(folder / "pets", {"cat": 4, "dog": 6})
    monkeypatch.setitem(sys.modules, "torchvision", None)  # not installed
    with pytest.raises(SharpscopeError, match=r"sharpscope\[vision\]"):
        load_dataset("pets")
    _fake_torchvision(monkeypatch)
    ds = load_dataset("pets")
    assert ds.train_x.shape == (8, 3, 4, 5) and len(ds.test_y) == 2 and ds.num_classes == 2
    assert ds.spec["classes"] == ["cat", "dog"] and 0 <= ds.train_x.min() <= ds.train_x.max() <= 1
    # train/ and test/: the test split's classes by name, even if it lacks one.
    _images(folder / "split" / "train", {"a": 2, "b": 2, "c": 2})
    _images(folder / "split" / "test", {"b": 1, "c": 2})
    split = load_dataset("split")
    assert split.test_y.tolist() == [1, 2, 2] and split.spec["held_out_test"] is False
    _images(folder / "mixed", {"a": 1})
    _images(folder / "mixed2", {"a": 1}, size=(6, 6))
    os.replace(folder / "mixed2" / "a" / "0.png", folder / "mixed" / "a" / "1.png")
    with pytest.raises(SharpscopeError, match="resize the images"):
        load_dataset("mixed")


# -- what a checkpoint records, and what must be named again -----------------------------------
@pytest.fixture
def run(folder):
    """A run of mymodel.py:make (width 8) on mydata.npz, trained in ``folder``."""
    config = TrainConfig(
        data="mydata.npz", model="mymodel.py:make", model_kwargs={"width": 8}, batch_size=16
    )
    train(TrainConfig(**{**vars(config), "steps": 3}), "run", quiet=True)
    return folder / "run"


def test_a_checkpoint_records_the_model_and_what_identifies_the_data(run):
    ckpt = read_checkpoint(run / "checkpoint.pt")
    assert ckpt["model"] == {
        "name": "mymodel.py:make",
        "kwargs": {"input_shape": [6], "num_classes": 3, "width": 8},
    }
    data = ckpt["data"]
    assert (data["name"], data["source"], data["task"]) == ("mydata.npz", "npz", "classification")
    assert data["sha256"] == load_dataset("mydata.npz").spec["sha256"]
    assert ckpt["config"]["model_kwargs"] == {"width": 8}
    assert json.loads((run / "config.json").read_text())["model_kwargs"] == {"width": 8}


def test_the_model_and_data_must_be_named_again(run, tmp_path, monkeypatch):
    path = run / "checkpoint.pt"
    with pytest.raises(SharpscopeError, match="--model mymodel.py:make"):
        load_checkpoint(path, data="mydata.npz")
    with pytest.raises(SharpscopeError, match="--data mydata.npz"):
        load_checkpoint(path, model="mymodel.py:make")
    net, ds, meta = load_model_and_data(str(path), model="mymodel.py:make", data="mydata.npz")
    assert net[1].out_features == 8 and meta["data"]["sha256"] == ds.spec["sha256"]
    assert load_model_and_data(str(path), trust_code=True)[0][1].out_features == 8
    # From another folder, naming the files by another path: the same factory and data.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    named = dict(model="../mymodel.py:make", data="../mydata.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same file: no warning
        net, _, meta = load_model_and_data("../run/checkpoint.pt", **named)
    assert meta["model"]["name"] == "../mymodel.py:make" and net[1].out_features == 8


@pytest.mark.parametrize("key", ["weights", "pretrained", "checkpoint_path", "cache_dir"])
def test_a_recorded_keyword_that_fetches_files_must_be_given_by_the_user(run, key):
    """A checkpoint recording weights="DEFAULT" (torchvision), pretrained=True or a
    checkpoint_path (timm) for the factory the user names would make sharpscope download
    or open what the file says: refused, unless the user gives the keyword themselves."""
    path = run / "checkpoint.pt"
    ckpt = read_checkpoint(path)
    ckpt["model"]["kwargs"][key] = "/etc/passwd" if key.endswith(("path", "dir")) else True
    torch.save(ckpt, run / "hostile.pt")
    named = {"model": "mymodel.py:make", "data": "mydata.npz"}
    with pytest.raises(SharpscopeError, match=f"records {key}="):
        load_model_and_data(str(run / "hostile.pt"), **named)
    with pytest.raises(SharpscopeError, match="fetch or read files"):
        load_model_and_data(str(run / "hostile.pt"), trust_code=True)
    net, _, _ = load_model_and_data(str(run / "hostile.pt"), model_options={key: None}, **named)
    assert net[1].out_features == 8


def test_other_data_is_measured_with_a_warning_and_never_resumed_on(run, capsys):
    x, y = _rng_arrays(seed=1)
    np.savez("mydata.npz", x_train=x, y_train=y)  # the file changed since training
    with pytest.warns(SharpscopeWarning, match="not the file it was trained on"):
        load_model_and_data(str(run / "checkpoint.pt"), model="mymodel.py:make", data="mydata.npz")
    argv = ["measure", str(run / "checkpoint.pt"), "--model", "mymodel.py:make"]
    assert main([*argv, "--data", "mydata.npz", *FAST_MEASURE]) == 0
    err = capsys.readouterr().err
    assert err.startswith("sharpscope measure: warning: ") and err.count("\n") == 1
    resume = ["train", "--out", str(run), "--resume", "--model", "mymodel.py:make"]
    assert "--resume: mydata.npz is not the file" in exit2(
        [*resume, "--data", "mydata.npz"], capsys
    )


def test_a_run_on_the_users_data_resumes_only_when_it_is_named(run, capsys):
    with pytest.raises(SharpscopeError, match="--data mydata.npz"):
        load_run_config(str(run), model="mymodel.py:make")
    config = load_run_config(str(run), model="mymodel.py:make", data="./mydata.npz")
    assert config.data == "./mydata.npz"
    resume = ["train", "--out", str(run), "--resume", "--model", "mymodel.py:make", "--quiet"]
    assert "'mydata.npz'" in exit2(resume, capsys)
    assert main([*resume, "--data", "./mydata.npz"]) == 0  # complete: nothing to do


def test_the_command_line_in_one_process(folder, capsys):
    """The end-to-end flow of the slow test below, in this process on tiny data."""
    mine = ["--model", "mymodel.py:make"]
    short = ["--steps", "3", "--quiet"]
    kwargs = ["--model-kwargs", '{"width": 8}']
    assert main(["train", *mine, *kwargs, "--data", "mydata.npz", *short, "--out", "run"]) == 0
    ckpt = "run/checkpoint.pt"
    named = [*mine, "--data", "mydata.npz"]
    assert main(["measure", ckpt, *named, *FAST_MEASURE]) == 0
    before = _files(folder)
    assert "--model mymodel.py:make" in exit2(["measure", ckpt, "--data", "mydata.npz"], capsys)
    landscape = ["landscape", ckpt, "--points", "3", "--samples", "16", "--quiet"]
    assert "--data mydata.npz" in exit2([*landscape, *mine, "--out", "s.npz"], capsys)
    assert _files(folder) == before
    assert main([*landscape, *named, "--dim", "2", "--out", "s.npz"]) == 0
    # Regression: float targets with --loss mse.
    reg = ["--data", "reg.npz"]
    assert main(["train", *mine, *reg, "--loss", "mse", *short, "--out", "reg"]) == 0
    capsys.readouterr()
    json_out = ["--json", "reg.json"]
    assert main(["measure", "reg/checkpoint.pt", *mine, *reg, *FAST_MEASURE, *json_out]) == 0
    result = json.loads(Path("reg.json").read_text())["results"][0]
    assert result["accuracy"] == {"train": None, "test": None} and result["loss_function"] == "mse"
    assert result["data"]["task"] == "regression"


def _sharpscope(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, "-m", "sharpscope", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_end_to_end_with_your_own_model_and_data(folder):
    marker = folder / "IMPORTED"
    (folder / "mymodel.py").write_text(
        MODEL_SOURCE + f"\nfrom pathlib import Path\nPath({str(marker)!r}).touch()\n"
    )
    mine = ["--model", "mymodel.py:make"]
    steps = ["--epochs", "1", "--batch-size", "16", "--quiet"]
    kwargs = ["--model-kwargs", '{"width": 8}']
    data = ["--data", "mydata.npz"]
    made = _sharpscope("train", *mine, *kwargs, *data, *steps, "--out", "run", cwd=folder)
    assert made.returncode == 0, made.stderr
    assert read_checkpoint(folder / "run" / "checkpoint.pt")["model"]["kwargs"]["width"] == 8
    named = [*mine, "--data", "mydata.npz"]
    measured = _sharpscope("measure", "run/checkpoint.pt", *named, *FAST_MEASURE, cwd=folder)
    assert measured.returncode == 0, measured.stderr
    assert "sharpness l2 rho=0.05" in measured.stdout
    marker.unlink()
    refused = _sharpscope("measure", "run/checkpoint.pt", "--data", "mydata.npz", cwd=folder)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "--model mymodel.py:make" in refused.stderr and not marker.exists()
    grid = ["--dim", "2", "--points", "3", "--samples", "16", "--out", "s.npz", "--quiet"]
    surface = _sharpscope("landscape", "run/checkpoint.pt", *named, *grid, cwd=folder)
    assert surface.returncode == 0 and (folder / "s.npz").is_file(), surface.stderr
    # Regression: float targets with --loss mse, through train and measure.
    reg = [*mine, "--data", "reg.npz"]
    trained = _sharpscope("train", *reg, "--loss", "mse", *steps, "--out", "reg", cwd=folder)
    assert trained.returncode == 0, trained.stderr
    measured = _sharpscope("measure", "reg/checkpoint.pt", *reg, *FAST_MEASURE, cwd=folder)
    assert measured.returncode == 0, measured.stderr
    assert "test loss" in measured.stdout and "test accuracy" in measured.stdout
