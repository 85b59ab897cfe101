import sys

import pytest
import torch

from sharpscope.errors import SharpscopeError
from sharpscope.models import build_model, model_spec


@pytest.mark.parametrize(
    "name, shape, options",
    [
        ("mlp", (1, 8, 8), {"width": 16, "depth": 3, "activation": "gelu"}),
        ("cnn", (1, 8, 8), {"width": 4}),
        ("cnn", (3, 32, 32), {"width": 4, "batchnorm": True}),
        ("cnn1d", (1, 40), {}),
        ("resnet18", (3, 32, 32), {"width": 4}),
        ("wrn", (3, 32, 32), {"depth": 10, "width": 1}),
    ],
)
def test_registry_models_give_logits_per_class(name, shape, options):
    model = build_model(model_spec(name, shape, 7, **options))
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_cnn1d_is_the_mnist1d_paper_size():
    # Greydanus (2020): 3 conv layers of 25 channels and a linear layer on 25 * 5 features.
    model = build_model(model_spec("cnn1d", (1, 40), 10))
    assert model[-1].in_features == 125


def test_wrn_28_10_has_the_papers_parameter_count():
    # Zagoruyko & Komodakis (2016), Table 1: WRN-28-10 has 36.5M parameters.
    model = build_model(model_spec("wrn", (3, 32, 32), 10, depth=28, width=10))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(36.5e6, rel=0.01)


def test_unknown_model_option_and_architecture_errors():
    with pytest.raises(SharpscopeError, match="unknown model"):
        model_spec("vgg", (1, 8, 8), 10)
    with pytest.raises(SharpscopeError, match="does not take --depth"):
        model_spec("resnet18", (3, 32, 32), 10, depth=3)
    with pytest.raises(SharpscopeError, match="6n \\+ 4"):
        build_model(model_spec("wrn", (3, 32, 32), 10, depth=12))
    with pytest.raises(SharpscopeError, match="image inputs"):
        build_model(model_spec("cnn", (1, 40), 10))


def test_user_factory_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_arch.py").write_text(
        "import torch\n"
        "def tiny(num_classes, hidden=3):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, hidden),\n"
        "                               torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes))\n"
        "not_a_factory = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = model_spec("my_arch:tiny", (1, 8, 8), 10)
    assert spec["kwargs"] == {"num_classes": 10}  # input_shape not asked for, not passed
    assert build_model(spec)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(SharpscopeError, match="no callable"):
        model_spec("my_arch:not_a_factory", (1, 8, 8), 10)
    with pytest.raises(SharpscopeError, match="cannot import"):
        model_spec("no_such_module_xyz:f", (1, 8, 8), 10)
    sys.modules.pop("my_arch", None)
