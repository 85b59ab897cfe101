import os

import pytest
import torch

from sharpscope.checkpoint import atomic_write, load_checkpoint, read_checkpoint, save_checkpoint
from sharpscope.data import data_spec
from sharpscope.errors import SharpscopeError
from sharpscope.models import build_model, model_spec


def saved_checkpoint(path, **extra):
    spec = model_spec("mlp", (1, 8, 8), 10, width=8, depth=1)
    model = build_model(spec)
    save_checkpoint(
        path,
        {
            "model": spec,
            "data": data_spec("digits"),
            "config": {"lr": 0.1},
            "metrics": {},
            "state_dict": model.state_dict(),
            **extra,
        },
    )
    return model


def test_checkpoint_round_trip_rebuilds_the_same_function(tmp_path):
    path = tmp_path / "c.pt"
    model = saved_checkpoint(path)
    raw = torch.load(path, weights_only=True)  # the contract: plain values only
    assert raw["format"] == "sharpscope-checkpoint" and raw["config"] == {"lr": 0.1}
    rebuilt, meta = load_checkpoint(path)
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)
    assert meta["model"]["name"] == "mlp" and "state_dict" not in meta
    assert not rebuilt.training


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/sharpscope-should-never-exist",))


def test_pickled_objects_are_refused_and_never_run(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "obj": Payload()}, path)
    with pytest.raises(SharpscopeError, match="arbitrary unpickling"):
        read_checkpoint(path)
    assert not os.path.exists("/tmp/sharpscope-should-never-exist")


@pytest.mark.parametrize(
    "content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage", b"hello"]
)
def test_non_checkpoint_files_give_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(SharpscopeError, match="not a readable checkpoint"):
        read_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(SharpscopeError, match="no such file"):
        read_checkpoint(tmp_path / "nope.pt")


def test_a_tensor_that_is_not_a_dict_is_refused(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    with pytest.raises(SharpscopeError, match="not a sharpscope checkpoint"):
        read_checkpoint(tmp_path / "t.pt")


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "new.pt"
    saved_checkpoint(path, version=99)
    with pytest.raises(SharpscopeError, match="newer"):
        read_checkpoint(path)


def test_plain_state_dict_needs_and_accepts_a_named_model(tmp_path):
    model = build_model(model_spec("cnn", (1, 8, 8), 10, width=4))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(SharpscopeError, match="--model"):
        load_checkpoint(tmp_path / "sd.pt")
    rebuilt, meta = load_checkpoint(tmp_path / "sd.pt", model="cnn", data="digits", width=4)
    assert meta["model"]["kwargs"]["width"] == 4 and meta["data"]["name"] == "digits"
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)


def test_weights_that_do_not_fit_the_model(tmp_path):
    model = build_model(model_spec("cnn", (1, 8, 8), 10, width=4))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(SharpscopeError, match="do not fit"):
        load_checkpoint(tmp_path / "sd.pt", model="mlp", data="digits")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "keep.txt"
    path.write_text("precious")

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, failing)
    assert path.read_text() == "precious"
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_atomic_write_into_a_missing_folder(tmp_path):
    with pytest.raises(SharpscopeError, match="does not exist"):
        atomic_write(tmp_path / "missing" / "x.pt", lambda tmp: None)


def test_atomic_write_gives_ordinary_file_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "p.txt", lambda tmp: open(tmp, "w").write("x"))
    finally:
        os.umask(umask)
    assert (tmp_path / "p.txt").stat().st_mode & 0o777 == 0o644
