"""The objective: L(w), its gradient and Hessian-vector products over fixed data.

Every analyzer in sharpscope is a function of one scalar function of the weights
(docs/design.md, "One function of the weights")::

    L(w) = sum over batches b of (n_b / n) * mean loss of batch b at weights w

with ``w`` a flat 1-D vector over the selected parameters and n_b the examples of
batch b. The model is evaluated in eval mode (BatchNorm uses its running statistics,
dropout is off) with ``w`` swapped in for its parameters for the duration of a call, as
``torch.func.functional_call`` does, so the user's module is never written to: its
parameters, buffers and train/eval flags are the same after every call. Batches may have
any structure (:mod:`sharpscope.batches`); a ``batch_loss(model, batch)`` hook gives the
loss of batches that are not ``(inputs, targets)`` pairs.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from .batches import count_examples, make_source, to_device
from .errors import SharpscopeError, first_line
from .losses import LossFn, class_hits, cross_entropy

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
    # Each parameter's own dtype: a model may keep some in another precision (float32
    # norms in a bf16 model); the flat vector holds all in the widest, and each piece is
    # cast back to its parameter's dtype.
    dtypes: tuple[torch.dtype, ...] = ()

    @classmethod
    def of(cls, model: nn.Module, names: list[str]) -> Layout:
        params = dict(model.named_parameters())
        shapes = tuple(params[n].shape for n in names)
        offsets, total = [], 0
        for s in shapes:
            offsets.append(total)
            total += s.numel()
        dtypes = tuple(params[n].dtype for n in names)
        return cls(tuple(names), shapes, tuple(offsets), total, dtypes)

    def unflatten(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of flat ``w`` (shape (numel,)) with each parameter's shape.

        One ``torch.split`` rather than a slice per parameter: the backward of a slice
        allocates a zero tensor the size of ``w`` for each parameter, so a gradient through
        per-parameter slices costs O(tensors x parameters) (a ResNet-18 HVP 6x slower);
        split's backward concatenates once. The numbers are the same.
        """
        sizes = [s.numel() for s in self.shapes]
        pieces = torch.split(w, sizes)
        dtypes = self.dtypes or (w.dtype,) * len(sizes)
        return {
            n: piece.view(s).to(dtype)
            for n, s, piece, dtype in zip(self.names, self.shapes, pieces, dtypes, strict=True)
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


Data = Any  # (inputs, targets) tensors, a dict of tensors, a list of batches, a DataLoader
BatchLoss = Callable[[nn.Module, Any], torch.Tensor]


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """Run scaled_dot_product_attention by its math kernel for the duration.

    torch's fused attention kernels (flash, memory-efficient, and the CPU flash kernel)
    have no double backward, so an HVP through a transformer fails with them; the math
    kernel is plain differentiable operations. Only passes that differentiate twice run
    under it; values and gradients keep the fast kernels.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch before 2.3: no fused-kernel switch to make
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


class Objective:
    """L(w) of ``model`` on fixed ``data``, over selected parameters.

    Args:
        model: any ``nn.Module``; never modified.
        data: the examples, passed over once per evaluation (see
            :mod:`sharpscope.batches`): an ``(inputs, targets)`` pair of tensors or a dict
            of tensors (cut into batches of ``batch_size``), a list of batches, or any
            re-iterable such as a ``DataLoader`` (streamed: one batch at a time is moved
            to the device; a shuffling loader or random augmentation is refused). A
            batch may be a tuple, a dict, a Hugging Face ``BatchEncoding``...
        loss_fn: ``(outputs, targets) -> mean loss`` for ``(inputs, targets)`` batches,
            with ``outputs = model(inputs)``; cross-entropy by default.
        batch_loss: ``(model, batch) -> mean loss of the batch``, for any batch
            (e.g. ``lambda m, b: m(**b).loss`` for a Hugging Face model); replaces
            ``loss_fn``. ``model`` is the user's module, called at the weights being
            evaluated. Accuracy is then not computed (None).
        examples_in: ``batch -> number of examples``, the weight of the batch's mean in
            L; default the first dimension of the batch's first tensor.
        param_filter: which parameters make up ``w`` (see :func:`select_parameters`);
            the others stay fixed at their current values.
        batch_size: examples per forward pass when ``data`` is held as tensors; default
            DEFAULT_BATCH_SIZE (512).
        device: where computation runs; default the model's device.
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
        data: Data,
        loss_fn: LossFn | None = None,
        *,
        batch_loss: BatchLoss | None = None,
        examples_in: Callable[[Any], int] | None = None,
        param_filter: ParamFilter = "all",
        batch_size: int | None = None,
        device: torch.device | str | None = None,
        accumulate_dtype: torch.dtype | None = None,
        distributed: bool | None = None,
    ):
        if batch_loss is not None and loss_fn is not None:
            raise SharpscopeError("give loss_fn or batch_loss, not both")
        if batch_loss is not None and not callable(batch_loss):
            raise SharpscopeError("batch_loss must be a function (model, batch) -> loss")
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None or batch_loss else cross_entropy
        self.batch_loss = batch_loss
        self.examples_in = examples_in or count_examples
        self.param_filter = param_filter if isinstance(param_filter, str) else "custom"
        names = select_parameters(model, param_filter)
        self.layout = Layout.of(model, names)
        params = dict(model.named_parameters())
        first = params[names[0]]
        self.device = torch.device(device) if device is not None else first.device
        # Fixed state: parameters outside the filter, and buffers (BN running stats),
        # copied: a forward pass that updates a buffer in place must not reach the model.
        self._fixed = {n: p.detach().to(self.device) for n, p in params.items() if n not in names}
        self._fixed.update(
            {n: b.detach().to(self.device, copy=True) for n, b in model.named_buffers()}
        )
        self.w0 = self.layout.flatten({n: params[n].detach() for n in names}).to(self.device)
        self.dtype = self.w0.dtype  # the widest of the parameters' dtypes
        self.accumulate_dtype = accumulate_dtype or self.dtype
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized()
        self.distributed = bool(distributed) and dist.get_world_size() > 1
        rank, world = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        self.source_batch_size = batch_size or DEFAULT_BATCH_SIZE
        self.source = make_source(
            data,
            self.source_batch_size,
            self.examples_in,
            rank=rank,
            world=world,
            counted=examples_in is None,
        )
        if self.source.total is not None:
            self.n_examples = self.source.total
        else:
            self.n_examples = int(self._sum(torch.tensor(self.source.examples)))
        if self.n_examples == 0:
            raise SharpscopeError("the data set is empty: no examples to evaluate the loss on")
        self.hvp_count = 0
        self.grad_count = 0

    @property
    def numel(self) -> int:
        """Number of entries of ``w``."""
        return self.layout.numel

    @property
    def single_batch(self) -> bool:
        """Whether one pass is one batch held in memory (on this process)."""
        return self.source.in_memory and self.source.n_batches == 1

    def batches(self) -> Iterator[Any]:
        """This process's batches, one at a time, moved to :attr:`device`."""
        for batch in self.source:
            yield to_device(batch, self.device)

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

    def batch_terms(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean loss of ``batch``, number of arg-max hits or None) with ``model`` as it
        stands: the user's ``batch_loss``, or ``loss_fn(model(inputs), targets)``."""
        if self.batch_loss is not None:
            loss = self.batch_loss(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise SharpscopeError(
                    "batch_loss must return the batch's mean loss as a one-element tensor, "
                    f"got {type(loss).__name__}"
                    + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
                )
            if torch.is_grad_enabled() and not loss.requires_grad:
                raise SharpscopeError(
                    "batch_loss returned a loss that does not depend on the weights "
                    "(computed under torch.no_grad(), or detached)"
                )
            return loss.reshape(()), None
        if not (isinstance(batch, list | tuple) and len(batch) == 2):
            raise SharpscopeError(
                f"a batch of type {type(batch).__name__} is not an (inputs, targets) pair: "
                "pass batch_loss=(model, batch) -> mean loss for batches of other forms"
            )
        x, y = batch
        out = model(x)
        return self.loss_fn(out, y), class_hits(out, y)

    def at(self, w: torch.Tensor | None, buffers: dict[str, torch.Tensor] | None = None):
        """Context in which the user's module computes with weights ``w`` (and
        ``buffers``), in eval mode; its own tensors and flags are back afterwards."""
        return _module_at(self.model, self.state(w, buffers))

    def _terms(
        self, w: torch.Tensor | None, buffers: dict[str, torch.Tensor] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(loss weighted by the batch's share of the examples, hits or None) for every
        batch at ``w``: the terms whose sum over batches (and ranks) is L(w)."""
        seen = 0
        for batch in self.batches():
            n = self.examples_in(batch)
            with self.at(w, buffers):
                loss, hits = self.batch_terms(self.model, batch)
            seen += n
            yield loss * (n / self.n_examples), hits
        expected = self.source.examples
        if expected is not None and seen != expected:
            raise SharpscopeError(
                f"the data gave {seen} examples on this pass and {expected} before: L(w) "
                "must be one fixed set of examples"
            )

    def value(self, w: torch.Tensor | None = None) -> float:
        """L(w) as a Python float."""
        return self.evaluate(w)["loss"]

    def evaluate(
        self, w: torch.Tensor | None = None, buffers: dict[str, torch.Tensor] | None = None
    ) -> dict[str, float | None]:
        """``{"loss": L(w), "accuracy": fraction of arg-max hits}`` (``buffers``: see
        :meth:`state`); accuracy is None where it is not defined (a ``batch_loss``,
        targets that are not class indices)."""
        total = torch.zeros((), dtype=self.accumulate_dtype, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        defined = True
        with torch.no_grad(), exact_float32():
            for loss, hits in self._terms(w, buffers):
                total += loss.to(self.accumulate_dtype)
                if hits is None:
                    defined = False
                else:
                    correct += hits
        total, correct = self._sum(total), self._sum(correct)
        accuracy = correct.item() / self.n_examples if defined else None
        return {"loss": total.item(), "accuracy": accuracy}

    def evaluate_many(
        self,
        weights: torch.Tensor,
        buffers: dict[str, torch.Tensor] | None = None,
        chunk: int = 16,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and accuracy at every row of ``weights`` (P, numel), ``chunk`` rows per
        forward pass with ``torch.func.vmap``: two float64 CPU tensors (P,), accuracy NaN
        where it is not defined. The same numbers as :meth:`evaluate` row by row (up to
        summation order); raises whatever vmap raises for a model it cannot batch."""
        fixed = self.state(self.w0, buffers)
        for name in self.layout.names:
            del fixed[name]
        zero = torch.zeros((), dtype=torch.int64, device=self.device)
        undefined = []  # whether a batch gave no accuracy (decided while vmap traces)

        def one(w: torch.Tensor, batch: Any):
            with _module_at(self.model, {**fixed, **self.layout.unflatten(w)}):
                loss, hits = self.batch_terms(self.model, batch)
            undefined.append(hits is None)
            return loss, zero if hits is None else hits

        losses, accuracies = [], []
        with torch.no_grad(), exact_float32():
            for start in range(0, len(weights), chunk):
                W = weights[start : start + chunk]
                total = torch.zeros(len(W), dtype=self.accumulate_dtype, device=self.device)
                correct = torch.zeros(len(W), dtype=torch.int64, device=self.device)
                for batch in self.batches():
                    n = self.examples_in(batch)
                    loss, hits = torch.func.vmap(functools.partial(one, batch=batch))(W)
                    total += loss.to(total.dtype) * (n / self.n_examples)
                    correct += hits
                losses.append(self._sum(total).double().cpu())
                accuracies.append(self._sum(correct).cpu().double() / self.n_examples)
        accuracy = torch.cat(accuracies)
        if any(undefined):
            accuracy = torch.full_like(accuracy, math.nan)
        return torch.cat(losses), accuracy

    def value_and_grad(self, w: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """(L(w), grad L(w)); the gradient is a flat vector in ``accumulate_dtype``."""
        w = (self.w0 if w is None else w).detach().requires_grad_(True)
        total = torch.zeros((), dtype=self.accumulate_dtype, device=self.device)
        grad = None
        with exact_float32(), torch.enable_grad():  # works inside a caller's no_grad
            for loss, _ in self._terms(w):
                (g,) = torch.autograd.grad(loss, w)
                total += loss.detach().to(self.accumulate_dtype)
                grad = self._accumulate(grad, g)
        self.grad_count += 1
        return self._sum(total).item(), self._sum(self._vector_or_zeros(grad))

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
        out = None
        with exact_float32(), torch.enable_grad(), twice_differentiable():
            for loss, _ in self._terms(w):
                (g,) = torch.autograd.grad(loss, w, create_graph=True)
                (hv,) = torch.autograd.grad(g, w, grad_outputs=v)
                out = self._accumulate(out, hv)
        self.hvp_count += 1
        return self._sum(self._vector_or_zeros(out))

    def _accumulate(self, total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
        """``total + term`` in ``accumulate_dtype``, the first term taken as it is: no
        zero vector the size of w written and added (0 + x = x, the same numbers)."""
        term = term.to(self.accumulate_dtype)
        return term if total is None else total.add_(term)

    def _vector_or_zeros(self, total: torch.Tensor | None) -> torch.Tensor:
        """A sum over no batches (a rank without examples) is zero."""
        if total is None:
            return torch.zeros(self.numel, dtype=self.accumulate_dtype, device=self.device)
        return total

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
            cache_graph = self.single_batch and not self.distributed
        if not cache_graph:
            return self.hvp
        if self.distributed:
            raise SharpscopeError("cache_graph does not work on a distributed objective")
        w = self.w0.detach().requires_grad_(True)
        with exact_float32(), torch.enable_grad(), twice_differentiable():
            terms = self._terms(w)
            grads = [torch.autograd.grad(loss, w, create_graph=True)[0] for loss, _ in terms]

        def matvec(v: torch.Tensor) -> torch.Tensor:
            v = self._vector(v)
            out = None
            with exact_float32(), torch.enable_grad():
                for g in grads:
                    (hv,) = torch.autograd.grad(g, w, grad_outputs=v, retain_graph=True)
                    out = self._accumulate(out, hv)
            self.hvp_count += 1
            return self._vector_or_zeros(out)

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
    except (TypeError, AttributeError) as exc:  # e.g. a dict of inputs given as a tensor
        raise SharpscopeError(
            f"the model cannot be evaluated on this data: {first_line(exc)} (batches that "
            "are not (inputs, targets) tensors need batch_loss=(model, batch) -> loss)"
        ) from exc


@contextlib.contextmanager
def _module_at(model: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """``model`` in eval mode with its parameters and buffers replaced by ``state`` for
    the duration, as ``torch.func.functional_call`` does (tied weights follow), so that a
    user's ``batch_loss`` can call the module, or any part of it, as usual."""
    with eval_mode(model), _reparametrize_module(model, state, tie_weights=True, strict=False):
        yield


def make_objective(
    model: nn.Module | Objective,
    data: Data | None = None,
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
        raise SharpscopeError(
            "no data given: pass (inputs, targets), a list of batches or a DataLoader"
        )
    options = {k: v for k, v in options.items() if v is not None}
    return Objective(model, data, loss_fn, **options)
