"""The objective: L(w), its gradient and Hessian-vector products over fixed data.

Every analyzer in sharpscope is a function of one scalar function of the weights
(docs/design.md, "One function of the weights")::

    L(w) = sum over batches b of (n_b / n) * mean loss of batch b at weights w

with ``w`` a flat 1-D vector over the selected parameters. The model is evaluated
in eval mode (BatchNorm uses its running statistics, dropout is off) through
``torch.func.functional_call``, so the user's module is never written to: its
parameters, buffers and train/eval flags are the same after every call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from .errors import SharpscopeError, first_line
from .losses import LossFn, correct_count, cross_entropy

_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)

ParamFilter = str | Callable[[str, nn.Parameter], bool]
# Examples per forward pass when the data comes as one (inputs, targets) pair: a size that
# fits CIFAR ResNets on a small GPU; it changes no number, only memory and speed.
DEFAULT_BATCH_SIZE = 512
PARAM_FILTERS = ("all", "weights")


def select_parameters(model: nn.Module, param_filter: ParamFilter = "all") -> list[str]:
    """Names of the trainable parameters that ``param_filter`` counts.

    "all": every parameter with ``requires_grad``. "weights": leaves out biases,
    every other 1-D parameter, and the parameters of normalization layers (the
    usual exclusion in sharpness studies, e.g. Andriushchenko et al. 2023, Sec. 4).
    A callable ``(name, parameter) -> bool`` selects by hand.
    """
    norm_params = {
        f"{mname}.{pname}" if mname else pname
        for mname, module in model.named_modules()
        if isinstance(module, _NORM_TYPES)
        for pname, _ in module.named_parameters(recurse=False)
    }
    names = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if param_filter == "all":
            keep = True
        elif param_filter == "weights":
            keep = p.dim() > 1 and name not in norm_params
        elif callable(param_filter):
            keep = bool(param_filter(name, p))
        else:
            choices = ", ".join(PARAM_FILTERS)
            raise SharpscopeError(
                f"unknown parameter filter {param_filter!r}: choose one of {choices}"
            )
        if keep:
            names.append(name)
    if not names:
        raise SharpscopeError(f"parameter filter {param_filter!r} selects no parameters")
    return names


@dataclass(frozen=True)
class Layout:
    """Where each selected parameter lives in the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    numel: int

    @classmethod
    def of(cls, model: nn.Module, names: list[str]) -> Layout:
        params = dict(model.named_parameters())
        shapes = tuple(params[n].shape for n in names)
        offsets, total = [], 0
        for s in shapes:
            offsets.append(total)
            total += s.numel()
        return cls(tuple(names), shapes, tuple(offsets), total)

    def unflatten(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of flat ``w`` (shape (numel,)) with each parameter's shape.

        One ``torch.split`` rather than a slice per parameter: the backward of a slice
        allocates a zero tensor the size of ``w`` for each parameter, so a gradient through
        per-parameter slices costs O(tensors x parameters) (a ResNet-18 HVP 6x slower);
        split's backward concatenates once. The numbers are the same.
        """
        sizes = [s.numel() for s in self.shapes]
        pieces = torch.split(w, sizes)
        return {
            n: piece.view(s)
            for n, s, piece in zip(self.names, self.shapes, pieces, strict=True)
        }

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate ``tensors[name]`` for the names in the layout into one vector."""
        return torch.cat([tensors[n].reshape(-1) for n in self.names])


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """Disable TF32 on CUDA for the duration: curvature and small-rho sharpness
    differences are far below TF32's 10-bit mantissa (docs/algorithms.md, pitfalls)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


Batches = tuple[torch.Tensor, torch.Tensor] | Iterable[tuple[torch.Tensor, torch.Tensor]]


class Objective:
    """L(w) of ``model`` on fixed ``data`` under ``loss_fn``, over selected parameters.

    Args:
        model: any ``nn.Module``; never modified.
        data: an ``(inputs, targets)`` pair of tensors (split into batches of
            ``batch_size``) or an iterable of such batches (used as given).
        loss_fn: ``(outputs, targets) -> mean loss``; cross-entropy by default.
        param_filter: which parameters make up ``w`` (see :func:`select_parameters`);
            the others stay fixed at their current values.
        batch_size: examples per forward pass when ``data`` is a pair; default
            DEFAULT_BATCH_SIZE (512).
        device: where computation runs; default the model's device. Data is moved
            there once, at construction.
        accumulate_dtype: dtype in which batch contributions are summed and vectors
            returned (e.g. ``torch.float64`` for small-rho sharpness); default the
            parameters' dtype.
        distributed: shard the data over the processes of the default
            ``torch.distributed`` group and all-reduce every sum, so that each rank
            gets the full-data L, gradient and HVP (same numbers as one process up to
            summation order). Default: on when a process group is initialized (e.g.
            under ``torchrun``). Every rank must make the same calls.

    ``value``, ``value_and_grad``, ``hvp`` and ``evaluate`` take ``w`` (a flat
    vector; ``None`` means the model's own weights :attr:`w0`).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Batches,
        loss_fn: LossFn | None = None,
        *,
        param_filter: ParamFilter = "all",
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        accumulate_dtype: torch.dtype | None = None,
        distributed: bool | None = None,
    ):
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else cross_entropy
        self.param_filter = param_filter if isinstance(param_filter, str) else "custom"
        names = select_parameters(model, param_filter)
        self.layout = Layout.of(model, names)
        params = dict(model.named_parameters())
        first = params[names[0]]
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = first.dtype
        self.accumulate_dtype = accumulate_dtype or self.dtype
        # Fixed state: parameters outside the filter, and buffers (BN running stats).
        self._fixed = {n: p.detach().to(self.device) for n, p in params.items() if n not in names}
        self._fixed.update({n: b.to(self.device) for n, b in model.named_buffers()})
        self.w0 = self.layout.flatten({n: params[n].detach() for n in names}).to(self.device)
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized()
        self.distributed = bool(distributed) and dist.get_world_size() > 1
        self.batches = _to_batches(data, batch_size or DEFAULT_BATCH_SIZE, self.device)
        if self.distributed:
            rank, world = dist.get_rank(), dist.get_world_size()
            self.batches = _shard(self.batches, rank, world)
        self.n_examples = int(self._sum(torch.tensor(sum(len(y) for _, y in self.batches))))
        if self.n_examples == 0:
            raise SharpscopeError("the data set is empty: no examples to evaluate the loss on")
        self.hvp_count = 0
        self.grad_count = 0

    @property
    def numel(self) -> int:
        """Number of entries of ``w``."""
        return self.layout.numel

    def state(
        self, w: torch.Tensor | None = None, buffers: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The full parameter-and-buffer dict for ``functional_call`` at ``w``.

        ``buffers`` overrides some of the model's buffers (e.g. recalibrated or
        interpolated BatchNorm statistics).
        """
        return {
            **self._fixed,
            **(buffers or {}),
            **self.layout.unflatten(self.w0 if w is None else w),
        }

    def forward(
        self,
        w: torch.Tensor | None,
        inputs: torch.Tensor,
        buffers: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Model outputs at weights ``w`` (eval mode), without touching the module."""
        with eval_mode(self.model):
            return functional_call(self.model, self.state(w, buffers), (inputs,))

    def _terms(
        self, w: torch.Tensor | None, buffers: dict[str, torch.Tensor] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(outputs, targets, loss weighted by the batch's share of the examples) for
        every batch at ``w``: the terms whose sum over batches (and ranks) is L(w)."""
        for x, y in self.batches:
            out = self.forward(w, x, buffers)
            yield out, y, self.loss_fn(out, y) * (len(y) / self.n_examples)

    def value(self, w: torch.Tensor | None = None) -> float:
        """L(w) as a Python float."""
        return self.evaluate(w)["loss"]

    def evaluate(
        self, w: torch.Tensor | None = None, buffers: dict[str, torch.Tensor] | None = None
    ) -> dict[str, float]:
        """``{"loss": L(w), "accuracy": fraction of arg-max hits}`` (``buffers``: see
        :meth:`state`)."""
        total = torch.zeros((), dtype=self.accumulate_dtype, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        with torch.no_grad(), exact_float32():
            for out, y, loss in self._terms(w, buffers):
                total += loss.to(self.accumulate_dtype)
                correct += correct_count(out, y)
        total, correct = self._sum(total), self._sum(correct)
        return {"loss": total.item(), "accuracy": correct.item() / self.n_examples}

    def evaluate_many(
        self,
        weights: torch.Tensor,
        buffers: dict[str, torch.Tensor] | None = None,
        chunk: int = 16,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and accuracy at every row of ``weights`` (P, numel), ``chunk`` rows per
        forward pass with ``torch.func.vmap``: two float64 CPU tensors (P,). The same
        numbers as :meth:`evaluate` row by row (up to summation order); raises whatever
        vmap raises for a model it cannot batch."""
        fixed = self.state(self.w0, buffers)
        for name in self.layout.names:
            del fixed[name]

        def one(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
            out = functional_call(self.model, {**fixed, **self.layout.unflatten(w)}, (x,))
            return self.loss_fn(out, y), correct_count(out, y)

        run = torch.func.vmap(one, in_dims=(0, None, None))
        losses, accuracies = [], []
        with torch.no_grad(), exact_float32(), eval_mode(self.model):
            for start in range(0, len(weights), chunk):
                W = weights[start : start + chunk]
                total = torch.zeros(len(W), dtype=self.accumulate_dtype, device=self.device)
                correct = torch.zeros(len(W), dtype=torch.int64, device=self.device)
                for x, y in self.batches:
                    loss, hits = run(W, x, y)
                    total += loss.to(total.dtype) * (len(y) / self.n_examples)
                    correct += hits
                losses.append(self._sum(total).double().cpu())
                accuracies.append(self._sum(correct).cpu().double() / self.n_examples)
        return torch.cat(losses), torch.cat(accuracies)

    def value_and_grad(self, w: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """(L(w), grad L(w)); the gradient is a flat vector in ``accumulate_dtype``."""
        w = (self.w0 if w is None else w).detach().requires_grad_(True)
        total = torch.zeros((), dtype=self.accumulate_dtype, device=self.device)
        grad = torch.zeros(self.numel, dtype=self.accumulate_dtype, device=self.device)
        with exact_float32(), torch.enable_grad():  # works inside a caller's no_grad
            for _, _, loss in self._terms(w):
                (g,) = torch.autograd.grad(loss, w)
                total += loss.detach().to(self.accumulate_dtype)
                grad += g.to(self.accumulate_dtype)
        self.grad_count += 1
        return self._sum(total).item(), self._sum(grad)

    def grad(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """grad L(w) as a flat vector."""
        return self.value_and_grad(w)[1]

    def hvp(self, v: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """Hessian-vector product H(w) v by exact double backward.

        Built with ``torch.autograd.grad(..., create_graph=True)`` rather than
        ``backward(create_graph=True)``, which leaks through a reference cycle
        (PyHessian issues 25 and 28). ``v`` has shape (numel,).
        """
        v = self._vector(v)
        w = (self.w0 if w is None else w).detach().requires_grad_(True)
        out = torch.zeros(self.numel, dtype=self.accumulate_dtype, device=self.device)
        with exact_float32(), torch.enable_grad():
            for _, _, loss in self._terms(w):
                (g,) = torch.autograd.grad(loss, w, create_graph=True)
                (hv,) = torch.autograd.grad(g, w, grad_outputs=v)
                out += hv.to(self.accumulate_dtype)
        self.hvp_count += 1
        return self._sum(out)

    def hvp_operator(
        self, cache_graph: bool | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """v -> H v at :attr:`w0` (the numbers of :meth:`hvp`, counted in
        ``hvp_count``), optionally from a gradient graph built once.

        With ``cache_graph`` the graph of grad L(w) (create_graph=True) is built once per
        batch and kept, so each product is one backward pass through it instead of a
        forward, a backward and that pass: the trick PyHessian uses for a single batch.
        Memory: every batch's graph stays alive while the operator does, so the default
        (None) caches only when the objective is one batch and not distributed. Products
        work inside a caller's ``torch.no_grad()`` too.
        """
        if cache_graph is None:
            cache_graph = len(self.batches) == 1 and not self.distributed
        if not cache_graph:
            return self.hvp
        if self.distributed:
            raise SharpscopeError("cache_graph does not work on a distributed objective")
        w = self.w0.detach().requires_grad_(True)
        with exact_float32(), torch.enable_grad():
            grads = [
                torch.autograd.grad(loss, w, create_graph=True)[0] for *_, loss in self._terms(w)
            ]

        def matvec(v: torch.Tensor) -> torch.Tensor:
            v = self._vector(v)
            out = torch.zeros(self.numel, dtype=self.accumulate_dtype, device=self.device)
            with exact_float32(), torch.enable_grad():
                for g in grads:
                    (hv,) = torch.autograd.grad(g, w, grad_outputs=v, retain_graph=True)
                    out += hv.to(self.accumulate_dtype)
            self.hvp_count += 1
            return out

        return matvec

    def _vector(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape != (self.numel,):
            raise ValueError(f"v must have shape ({self.numel},), got {tuple(v.shape)}")
        return v.to(device=self.device, dtype=self.dtype)

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (itself when not distributed)."""
        if self.distributed:
            t = t.to(self.device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def check_finite(self, w: torch.Tensor | None = None) -> float:
        """L(w), raising :class:`SharpscopeError` if it is NaN or infinite, or if the
        model cannot take the data (a checkpoint measured on another data set)."""
        with model_fits_data():
            value = self.value(w)
        if not torch.isfinite(torch.tensor(value)):
            raise SharpscopeError(f"the loss at the given weights is {value}: nothing to measure")
        return value


@contextlib.contextmanager
def model_fits_data() -> Iterator[None]:
    """Turn the error of a model that cannot take the data's shape or classes (torch's
    RuntimeError or IndexError from inside the forward pass or the loss) into a one-line
    :class:`SharpscopeError`. For the first evaluation of a model on data."""
    try:
        yield
    except (torch.OutOfMemoryError, dist.DistBackendError):
        raise  # not the data's fault: the full error, as it is
    except (RuntimeError, IndexError, ValueError) as exc:
        raise SharpscopeError(
            f"the model cannot be evaluated on this data: {first_line(exc)}"
        ) from exc


def _shard(batches: list, rank: int, world: int) -> list:
    """This rank's share of the examples: a contiguous range of the concatenated
    batches, cut at batch boundaries, so shards differ in size by at most one."""
    total = sum(len(y) for _, y in batches)
    lo, hi = total * rank // world, total * (rank + 1) // world
    shards, start = [], 0
    for x, y in batches:
        a, b = max(lo - start, 0), min(hi - start, len(y))
        if b > a:
            shards.append((x[a:b], y[a:b]))
        start += len(y)
    return shards


def _to_batches(data: Batches, batch_size: int, device: torch.device) -> list:
    if batch_size <= 0:
        raise SharpscopeError(f"batch size must be positive, got {batch_size}")
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if len(x) != len(y):
            raise SharpscopeError(f"{len(x)} inputs but {len(y)} targets")
        x, y = x.to(device), y.to(device)
        return [
            (x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)
        ]
    return [(x.to(device), y.to(device)) for x, y in data]


def make_objective(
    model: nn.Module | Objective,
    data: Batches | None = None,
    loss_fn: LossFn | None = None,
    **options,
) -> Objective:
    """An :class:`Objective` from ``(model, data)``, or ``model`` itself if it is one.

    Every analyzer gets its objective here, so one rule holds for all: ``options`` are
    :class:`Objective`'s keywords, and None (or ``param_filter="all"``) means "not
    given"; an Objective comes with its own data, loss and options, so giving any of
    them besides is refused (:class:`SharpscopeError`) rather than silently ignored.
    """
    if isinstance(model, Objective):
        given = [
            name
            for name, value in (("data", data), ("loss_fn", loss_fn), *options.items())
            if value is not None and not (name == "param_filter" and value == "all")
        ]
        if given:
            raise SharpscopeError(
                f"an Objective was given: set {', '.join(given)} when building it, not here"
            )
        return model
    if data is None:
        raise SharpscopeError("no data given: pass (inputs, targets) or an iterable of batches")
    options = {k: v for k, v in options.items() if v is not None}
    return Objective(model, data, loss_fn, **options)
