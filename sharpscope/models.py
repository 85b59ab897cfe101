"""Model registry.

A model is described by a plain dict ``{"name": str, "kwargs": dict}`` (stored in
checkpoints) and rebuilt by :func:`build_model`. Built-ins: ``mlp``, ``cnn``,
``cnn1d``, ``resnet18`` and ``wrn``; any other name of the form
``package.module:factory`` calls the user's own factory.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import SharpscopeError

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise SharpscopeError(
            f"unknown activation {name!r}: choose one of {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]()


def mlp(
    input_shape: Sequence[int],
    num_classes: int,
    width: int = 128,
    depth: int = 2,
    activation: str = "relu",
) -> nn.Module:
    """A fully connected network: ``depth`` hidden layers of ``width`` units."""
    if depth < 0 or width <= 0:
        raise SharpscopeError("mlp needs --depth >= 0 and --width > 0")
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), _activation(activation)]
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)


def cnn(
    input_shape: Sequence[int],
    num_classes: int,
    width: int = 16,
    depth: int = 3,
    activation: str = "relu",
    batchnorm: bool = False,
) -> nn.Module:
    """A small 2-D CNN: ``depth`` 3x3 conv layers (width doubling after the first),
    a 2x2 max-pool after the second, global average pooling and a linear head."""
    if len(input_shape) != 3:
        raise SharpscopeError(f"cnn needs image inputs (C, H, W), got shape {tuple(input_shape)}")
    if depth < 1 or width <= 0:
        raise SharpscopeError("cnn needs --depth >= 1 and --width > 0")
    layers: list[nn.Module] = []
    channels = input_shape[0]
    for i in range(depth):
        out = width if i == 0 else 2 * width
        layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batchnorm))
        if batchnorm:
            layers.append(nn.BatchNorm2d(out))
        layers.append(_activation(activation))
        if i == 1:
            layers.append(nn.MaxPool2d(2))
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def cnn1d(
    input_shape: Sequence[int],
    num_classes: int,
    width: int = 25,
    activation: str = "relu",
) -> nn.Module:
    """The MNIST-1D paper's CNN (Greydanus 2020, ``ConvBase``): three 1-D convolutions
    of ``width`` channels (kernel 5 then 3, 3; stride 2; padding 1) and a linear
    layer on the flattened features. It reaches about 94% test accuracy there."""
    if len(input_shape) != 2:
        raise SharpscopeError(f"cnn1d needs 1-D inputs (C, L), got shape {tuple(input_shape)}")
    features = nn.Sequential(
        nn.Conv1d(input_shape[0], width, 5, stride=2, padding=1),
        _activation(activation),
        nn.Conv1d(width, width, 3, stride=2, padding=1),
        _activation(activation),
        nn.Conv1d(width, width, 3, stride=2, padding=1),
        _activation(activation),
        nn.Flatten(),
    )
    with torch.no_grad():
        n_features = features(torch.zeros(1, *input_shape)).shape[1]
    return nn.Sequential(*features, nn.Linear(n_features, num_classes))


class _BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 convs with BN, identity shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18, CIFAR variant: a 3x3 stem without max-pool, stages of 2 blocks
    with ``width``, 2w, 4w, 8w channels (w = 64 in He et al. 2016)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 64):
        super().__init__()
        if len(input_shape) != 3:
            raise SharpscopeError(
                f"resnet18 needs image inputs (C, H, W), got {tuple(input_shape)}"
            )
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        blocks, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            blocks += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


class _WideBlock(nn.Module):
    """Pre-activation wide basic block (Zagoruyko & Komodakis 2016, Fig. 1d)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko & Komodakis 2016); WRN-28-10 is the SAM paper's
    CIFAR model (Foret et al. 2021, Table 1). depth = 6n + 4."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 28,
        width: int = 10,
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise SharpscopeError(f"wrn needs image inputs (C, H, W), got {tuple(input_shape)}")
        if (depth - 4) % 6 or depth < 10:
            raise SharpscopeError(f"wrn depth must be 6n + 4 (10, 16, 22, 28, ...), got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(input_shape[0], channels[0], 3, 1, 1, bias=False)
        blocks, cin = [], channels[0]
        for stage, stride in enumerate((1, 2, 2)):
            for i in range(n):
                cout = channels[stage + 1]
                blocks.append(_WideBlock(cin, cout, stride if i == 0 else 1, dropout))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.blocks(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "cnn1d": cnn1d,
    "resnet18": ResNet18,
    "wrn": WideResNet,
}
# The model each data set gets when none is named.
DEFAULT_MODEL = {
    "digits": "cnn",
    "mnist1d": "cnn1d",
    "cifar10": "resnet18",
    "cifar100": "resnet18",
    "synthetic": "mlp",
}


def model_spec(
    name: str, input_shape: Sequence[int], num_classes: int, **options: Any
) -> dict[str, Any]:
    """The plain-dict description of a model: registry name and every keyword.

    ``options`` with value None are left out so the architecture's own defaults
    apply; options the architecture does not take are refused.
    """
    factory = _resolve(name)
    kwargs: dict[str, Any] = {"input_shape": list(input_shape), "num_classes": int(num_classes)}
    accepted = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    for key, value in options.items():
        if value is None:
            continue
        if key not in accepted and not takes_any:
            raise SharpscopeError(f"model {name!r} does not take --{key.replace('_', '-')}")
        kwargs[key] = value
    if ":" in name:  # a user factory gets input_shape / num_classes only if it asks
        kwargs = {k: v for k, v in kwargs.items() if k in accepted or takes_any}
    return {"name": name, "kwargs": kwargs}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Instantiate the model described by ``spec`` (see :func:`model_spec`)."""
    factory = _resolve(spec["name"])
    try:
        model = factory(**spec.get("kwargs", {}))
    except TypeError as exc:
        raise SharpscopeError(f"cannot build model {spec['name']!r}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise SharpscopeError(f"model factory {spec['name']!r} did not return a torch.nn.Module")
    return model


def _resolve(name: str) -> Callable[..., nn.Module]:
    if name in MODELS:
        return MODELS[name]
    if ":" not in name:
        raise SharpscopeError(
            f"unknown model {name!r}: choose one of {', '.join(MODELS)}, or package.module:factory"
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SharpscopeError(f"cannot import {module_name!r} for --model {name}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SharpscopeError(f"{module_name!r} has no callable {attr!r} for --model {name}")
    return factory
