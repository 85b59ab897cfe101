"""Model registry.

A model is described by a plain dict ``{"name": str, "kwargs": dict}`` (stored in
checkpoints) and rebuilt by :func:`build_model`. Built-ins: ``mlp``, ``cnn``,
``cnn1d``, ``resnet18`` and ``wrn``; any other name, ``module:factory`` or
``path/to/file.py:factory``, calls the user's own factory (:mod:`sharpscope.usercode`),
``torchvision.models:resnet18`` and ``timm:create_model`` included.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .checks import is_real, is_whole
from .errors import SharpscopeError
from .usercode import call, parse_factory, resolve_factory

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


# The options the command line has flags for (--width, --depth, --activation).
FLAG_OPTIONS = ("width", "depth", "activation")


def merge_model_options(flags: dict[str, Any], kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The keywords of a model: the flags given (None = not given) and ``--model-kwargs``
    (where None means "do not pass this keyword"); a keyword given both ways is refused."""
    options = {k: v for k, v in flags.items() if v is not None}
    both = sorted(set(options) & set(kwargs or {}))
    if both:
        raise SharpscopeError(
            f"--{both[0].replace('_', '-')} and --model-kwargs both give {both[0]}: give it once"
        )
    return {**options, **(kwargs or {})}


def model_spec(
    name: str, input_shape: Sequence[int], num_classes: int, /, **options: Any
) -> dict[str, Any]:
    """The plain-dict description of a model: its name and every keyword it is built with.

    A registry model gets ``input_shape`` and ``num_classes``; a user's factory gets
    ``input_shape`` only if its signature names it, and ``num_classes`` if its signature
    names it or takes ``**kwargs`` (as torchvision's and timm's models take it).
    ``options`` add or replace keywords; one whose value is None is not passed (the
    flags left unset, or ``{"num_classes": null}`` in ``--model-kwargs``). Keywords the
    factory does not take are refused.
    """
    factory = _resolve(name)
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: not a model factory
        raise SharpscopeError(f"--model {name}: not a model factory (no signature)") from None
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    kwargs: dict[str, Any] = {"input_shape": list(input_shape), "num_classes": int(num_classes)}
    if name not in MODELS:
        if "input_shape" not in accepted:
            del kwargs["input_shape"]
        if "num_classes" not in accepted and not takes_any:
            del kwargs["num_classes"]
    for key, value in options.items():
        if value is None:
            kwargs.pop(key, None)
            continue
        if key not in accepted and not takes_any:
            what = f"--{key}" if key in FLAG_OPTIONS else f"the keyword {key!r}"
            raise SharpscopeError(f"model {name!r} does not take {what}")
        kwargs[key] = value
    return {"name": name, "kwargs": kwargs}


# The types of the registry models' keywords, checked before a spec read from a file is
# built (a factory given a string width fails deep inside torch, not with a message).
_KWARG_KINDS = {
    "input_shape": "shape",
    "num_classes": "count",
    "width": "count",
    "depth": "int",
    "activation": "str",
    "batchnorm": "bool",
    "dropout": "fraction",
}


# The deepest registry model: even its meta build takes a layer-by-layer loop, and the
# deepest networks in the literature have about a thousand layers (He et al. 2016's
# ResNet-1001).
MAX_DEPTH = 1000


def _check_registry_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    depth = kwargs.get("depth")
    if isinstance(depth, int) and depth > MAX_DEPTH:
        raise SharpscopeError(f"cannot build model {name!r}: depth {depth} (at most {MAX_DEPTH})")
    for key, value in kwargs.items():
        kind = _KWARG_KINDS.get(key)
        ok = {
            None: True,  # unknown keywords: the factory's signature refuses them
            "shape": isinstance(value, list | tuple)
            and 1 <= len(value) <= 4
            and all(is_whole(v, 1) for v in value),
            "count": is_whole(value, 1),
            "int": is_whole(value),
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
            "fraction": is_real(value) and 0 <= value < 1,
        }[kind]
        if not ok:
            raise SharpscopeError(f"cannot build model {name!r}: bad {key} {value!r}")


def check_spec(spec: Any, source: str = "model spec") -> tuple[str, dict[str, Any]]:
    """``(name, kwargs)`` of a model spec, or one line saying what is wrong with it."""
    if not isinstance(spec, dict):
        raise SharpscopeError(f"{source}: a model spec must be a dict, got {type(spec).__name__}")
    name, kwargs = spec.get("name"), spec.get("kwargs", {})
    if not isinstance(name, str) or not name:
        raise SharpscopeError(f"{source}: the model spec has no name")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise SharpscopeError(f"{source}: the model's kwargs are not a dict")
    if name in MODELS:
        _check_registry_kwargs(name, kwargs)
    return name, kwargs


def _on_meta(spec: dict[str, Any], source: str = "model spec") -> nn.Module | None:
    name, kwargs = check_spec(spec, source)
    factory = _resolve(name)
    try:
        with torch.device("meta"):
            model = factory(**kwargs)
    except SharpscopeError:
        raise
    except Exception as exc:
        if name in MODELS:  # our own factories run on meta: the spec is wrong
            raise SharpscopeError(f"cannot build model {name!r}: {_first(exc)}") from None
        return None  # a user's factory may need real tensors; it is built for real
    if not isinstance(model, nn.Module):
        raise SharpscopeError(f"model factory {name!r} did not return a torch.nn.Module")
    return model


def build_model(
    spec: dict[str, Any],
    *,
    weights: dict[str, torch.Tensor] | None = None,
    max_bytes: int | None = None,
    source: str = "model spec",
) -> nn.Module:
    """Instantiate the model described by ``spec`` (see :func:`model_spec`).

    The model is first built on the ``meta`` device, which allocates nothing: a spec
    whose parameter shapes differ from ``weights`` (the state_dict it is for), or whose
    parameters and buffers would take more than ``max_bytes``, is refused before any
    memory is taken (a checkpoint cannot make sharpscope allocate more than it holds).
    """
    name, kwargs = check_spec(spec, source)
    if weights is not None or max_bytes is not None:
        skeleton = _on_meta(spec, source)
        if skeleton is not None:
            if weights is not None:
                check_weights_fit(skeleton.state_dict(), weights, source)
            size = sum(t.numel() * t.element_size() for t in skeleton.state_dict().values())
            if max_bytes is not None and size > max_bytes:
                raise SharpscopeError(
                    f"model {name!r} would take {size / 2**30:.3g} GiB, more than the "
                    f"{max_bytes / 2**30:.3g} GiB available"
                )
    factory = _resolve(name)
    if name in MODELS:
        try:
            model = factory(**kwargs)
        except SharpscopeError:
            raise
        except (TypeError, ValueError, RuntimeError) as exc:
            raise SharpscopeError(f"cannot build model {name!r}: {_first(exc)}") from None
    else:  # the user's code: whatever it raises is one line saying where
        model = call(factory, f"building model {name!r}", **kwargs)
    if not isinstance(model, nn.Module):
        raise SharpscopeError(f"model factory {name!r} did not return a torch.nn.Module")
    return model


def check_weights_fit(
    model_state: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], source: str
) -> None:
    """Refuse ``weights`` whose names, shapes or kinds of number (real, complex, whole)
    differ from ``model_state``'s: load_state_dict would fail, or cast them silently."""
    have = {k: tuple(v.shape) for k, v in model_state.items()}
    want = {k: tuple(v.shape) for k, v in weights.items()}
    if have != want:
        detail = _shape_difference(have, want)
        raise SharpscopeError(f"{source}: weights do not fit the model ({detail})")
    for key, value in weights.items():
        if _number_kind(value) != _number_kind(model_state[key]):
            raise SharpscopeError(
                f"{source}: weights do not fit the model ({key}: {value.dtype} weights "
                f"for a {model_state[key].dtype} model)"
            )


def _number_kind(t: torch.Tensor) -> str:
    return "complex" if t.is_complex() else "real" if t.is_floating_point() else "whole"


def _shape_difference(have: dict[str, tuple], want: dict[str, tuple]) -> str:
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    if missing or unexpected:
        what = []
        if unexpected:
            what.append(f"the model has {', '.join(unexpected[:3])}, the weights do not")
        if missing:
            what.append(f"the weights have {', '.join(missing[:3])}, the model does not")
        return "; ".join(what)
    key = next(k for k in want if have[k] != want[k])
    return f"{key}: weights {list(want[key])}, model {list(have[key])}"


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_model_name(name: Any) -> str:
    """``name`` if it is a registry model or a factory (``module:factory``,
    ``path/to/file.py:factory``)."""
    if isinstance(name, str) and (name in MODELS or parse_factory(name) is not None):
        return name
    raise SharpscopeError(
        f"unknown model {name!r}: choose one of {', '.join(MODELS)}, or module:factory, "
        "or path/to/file.py:factory"
    )


def _resolve(name: str) -> Callable[..., nn.Module]:
    if name in MODELS:
        return MODELS[name]
    return resolve_factory(check_model_name(name), "--model")
