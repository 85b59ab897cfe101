"""Sharpness-aware minimization: SAM, ASAM and GSAM as ``torch.optim.Optimizer`` wrappers.

SAM (Foret et al. 2021, eq. 2-3) minimizes max_{||eps||_p <= rho} L(w + eps) with one
ascent step and one descent step per batch::

    g     = grad L_B(w)
    eps   = rho * sign(g) |g|^(q-1) / (||g||_q^(q-1) + 1e-12),   1/p + 1/q = 1
    g_sam = grad L_B(w + eps)
    w     <- base_optimizer_step(w, g_sam)

(p = 2: eps = rho g / ||g||_2; p = inf: eps = rho sign(g)). The norm is one global
norm over all parameters; w is restored from a saved copy, not by subtracting eps.
ASAM (Kwon et al. 2021) measures eps in the coordinates u = eps / T with
T = |w| + eta elementwise, giving eps = rho T^2 g / ||T g|| for p = 2.
GSAM (Zhuang et al. 2022) replaces g_sam by g_sam - alpha g_perp, where g_perp is the
part of g orthogonal to g_sam.

The interface is davda54/sam's (``first_step``, ``second_step``, ``step(closure)``), so
existing loops work unchanged. Unlike that file, the wrapper shares both the parameter
groups and the state of its base optimizer: ``state_dict`` holds the momentum buffers
(resume works), and learning-rate schedulers attach to the SAM object directly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Added to the norm in the denominator of eps, as in Foret et al.'s code and davda54/sam.
NORM_GUARD = 1e-12


def _dual_exponent(p: float) -> float:
    """q with 1/p + 1/q = 1 (p = 1 -> inf, p = inf -> 1)."""
    if p == 1:
        return math.inf
    if math.isinf(p):
        return 1.0
    return p / (p - 1.0)


def parse_p(p: float | int | str) -> float:
    """The perturbation norm p as a float (``"inf"`` allowed); p >= 1 required."""
    try:
        value = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"p must be a number >= 1 or 'inf', got {p!r}") from None
    if not value >= 1:  # also refuses NaN
        raise ValueError(f"p must be >= 1 (or inf), got {p!r}")
    return value


def dual_norm_step(vectors: list[torch.Tensor], p: float, rho: float) -> list[torch.Tensor]:
    """The maximizer u of <v, u> over ||u||_p <= rho, for v split into several tensors.

    u = rho * sign(v) |v|^(q-1) / (||v||_q^(q-1) + 1e-12), 1/p + 1/q = 1 (Foret et al.
    2021, eq. 2), with ||.||_q one norm over all the tensors. p = 2 gives
    rho v / (||v||_2 + 1e-12); p = inf gives rho sign(v); p = 1 puts rho on the
    largest |v_i| (shared equally among ties). Returns tensors shaped like ``vectors``.
    """
    if not vectors:
        return []
    device = vectors[0].device
    if math.isinf(p):  # q = 1: |v|^0 / ||v||_1^0 = 1 wherever v != 0
        return [rho * torch.sign(v) for v in vectors]
    if p == 1:  # q = inf: all the budget on the largest coordinates
        top = torch.stack([v.abs().max() for v in vectors]).max()
        masks = [(v.abs() == top) & (top > 0) for v in vectors]
        count = torch.stack([m.sum() for m in masks]).sum().clamp_min(1)
        return [rho * torch.sign(v) * m / count for v, m in zip(vectors, masks, strict=True)]
    q = _dual_exponent(p)
    if p == 2:
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(v, 2).to(device) for v in vectors]), 2
        )
        scale = rho / (norm + NORM_GUARD)
        return [v * scale.to(v.device) for v in vectors]
    # General p: |v|^(q-1) / ||v||_q^(q-1) = (|v| / ||v||_q)^(q-1), computed on the ratio
    # so that large q cannot overflow; the guard factor n/(n + 1e-12), n = ||v||_q^(q-1),
    # keeps the formula's +1e-12 exactly.
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(v, q).to(device) for v in vectors]), q
    )
    power = norm.pow(q - 1)
    guard = 1.0 / (1.0 + NORM_GUARD / power)  # 0 when v = 0, 1 when power = inf
    safe = norm.clamp_min(torch.finfo(norm.dtype).tiny)
    out = []
    for v in vectors:
        ratio = v.abs() / safe.to(v.device)
        out.append(rho * torch.sign(v) * ratio.pow(q - 1) * guard.to(v.device))
    return out


@contextlib.contextmanager
def bn_running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """Forward passes inside leave BatchNorm running statistics untouched.

    BatchNorm layers in train mode keep normalizing with the batch statistics, but
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` are not updated:
    what SAM needs at the perturbed point w + eps (davda54/sam issues 17 and 40; its
    momentum-0 trick still advances ``num_batches_tracked``). Implemented by clearing
    ``track_running_stats`` on the train-mode BatchNorm layers for the duration (they
    then use batch statistics and touch no buffer); layers in eval mode are left as
    they are, since they neither use batch statistics nor update anything.
    """
    layers = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


# What the errors about GradScaler misuse point to (see SAM's docstring).
SCALED_STEP_PATTERN = (
    "with a GradScaler, run each SAM step as: scaler.scale(loss).backward(); "
    "sam.first_step(zero_grad=True, scaler=scaler); scaler.scale(loss at w + eps).backward(); "
    "[scaler.unscale_(sam); clip the gradient]; scaler.step(sam); scaler.update() "
    "-- or sam.step(closure, scaler=scaler); scaler.update(), with a closure that calls "
    "scaler.scale(loss).backward()"
)


def _stage(scaler: Any, optimizer: object) -> str | None:
    """GradScaler's stage for ``optimizer`` this iteration ("READY", "UNSCALED",
    "STEPPED"), or None where the scaler does not expose it."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict):
        return None
    state = states.get(id(optimizer))
    if state is None:
        return "READY"
    return getattr(state.get("stage"), "name", None)


def _nonfinite(scaler: Any, optimizer: object, params: list[torch.Tensor]) -> torch.Tensor:
    """0-dim bool tensor, no sync: did ``scaler.unscale_(optimizer)`` find an inf/NaN?

    Read from the scaler's own record (what ``scaler.update()`` backs off on); where
    the scaler does not expose it, checked on the gradients of ``params`` directly.
    """
    try:
        found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        flags = [f.reshape(()) > 0 for f in found.values()]
    except (AttributeError, KeyError, TypeError):
        flags = [~torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    if not flags:
        return torch.zeros((), dtype=torch.bool)
    device = flags[0].device
    return torch.stack([f.to(device) for f in flags]).any()


class _FirstPassGradients:
    """Stands for a SAM optimizer in GradScaler's per-optimizer bookkeeping while the
    gradient at w is unscaled (``unscale_`` reads only ``param_groups``).

    GradScaler unscales each optimizer's gradients once per iteration; a SAM step has
    two gradients to unscale. The first is unscaled under this key, the second under
    the SAM object itself, so ``scaler.unscale_(sam)`` (to clip) and
    ``scaler.step(sam)`` keep their usual meaning, and ``scaler.update()`` backs off if
    either pass was non-finite.
    """

    def __init__(self, sam: SAM):
        self._sam = sam

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._sam.param_groups


@dataclass
class _ScaledStep:
    """A SAM step begun by ``first_step(scaler=...)``."""

    scaler: Any
    first_bad: torch.Tensor | None  # gradient at w non-finite; None: scaler disabled
    restored: bool = False  # back at w, the second gradient unscaled


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization around any base optimizer (Foret et al. 2021).

    Args:
        params: parameters or parameter groups, as for any optimizer. Groups may set
            their own ``rho``, ``adaptive`` and ``eta``.
        base_optimizer: the optimizer *class* that takes the descent step
            (e.g. ``torch.optim.SGD``); built on the same parameter groups.
        rho: radius of the neighbourhood (0.05: Foret et al. 2021, the CIFAR default).
            rho = 0 reproduces the base optimizer exactly.
        p: norm of the neighbourhood: 2 (default, the paper's), ``inf`` or any p >= 1.
        adaptive: ASAM (Kwon et al. 2021): measure eps relative to T = |w| + eta.
        eta: ASAM's offset (0 matches davda54/sam; the ASAM authors use 0.01).
        **base_kwargs: passed to ``base_optimizer`` (lr, momentum, weight_decay, ...).

    Use as in davda54/sam::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)          # w -> w + eps
        with bn_running_stats_frozen(model):
            loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)         # back to w, base step with grad at w + eps

    or ``opt.step(closure)`` after the first backward, with ``closure`` doing the second.

    With a ``torch.amp.GradScaler`` both gradients must be unscaled, and a step with a
    non-finite gradient in either pass skipped; give the scaler to ``first_step``::

        scaler.scale(loss_fn(model(x), y)).backward()     # (micro-batches accumulate)
        opt.first_step(zero_grad=True, scaler=scaler)     # unscales the gradient at w
        with bn_running_stats_frozen(model):
            scaler.scale(loss_fn(model(x), y)).backward()
        scaler.unscale_(opt)                              # only to clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        scaler.step(opt)                                  # or opt.second_step(zero_grad=True)
        scaler.update()

    ``first_step`` stays at w if the gradient at w is not finite; the last call returns
    to w and lets the base optimizer step unless either gradient was non-finite, and
    ``scaler.update()`` then backs off. ``opt.step(closure, scaler=scaler)`` does the
    same with a closure (which calls ``scaler.scale(loss).backward()``). Any other
    use of the scaler with SAM raises (``scaler.step(opt, closure)`` would leave
    the gradient at w + eps scaled), naming this pattern; with a scaler, ``unperturb``
    also unscales the second gradient. A disabled scaler gives the plain SAM step.

    Under DistributedDataParallel the first backward leaves the gradient averaged over
    the processes in ``.grad``, so every process climbs to the same w + eps (one eps for
    the global batch). For each process's own eps (m-sharpness with m the per-process
    batch; one all-reduce fewer) run the first pass's forward *and* backward inside
    ``ddp_model.no_sync()``: DDP decides in the forward pass whether the backward
    all-reduces, so wrapping only ``backward()`` still all-reduces (davda54/sam issue
    78). The second pass is then all-reduced as usual.
    """

    # GradScaler.step(opt) then calls opt.step() itself, unscaling nothing and skipping
    # nothing: SAM restores w whatever the gradients are, and refuses what it cannot
    # do right (see step()).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        p: float | str = 2,
        adaptive: bool = False,
        eta: float = 0.0,
        **base_kwargs: Any,
    ):
        if not rho >= 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if not (
            isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)
        ):
            raise TypeError("base_optimizer must be an optimizer class such as torch.optim.SGD")
        self.p = parse_p(p)
        defaults = {"rho": float(rho), "adaptive": bool(adaptive), "eta": float(eta)}
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # Share groups and state with the base optimizer: a scheduler that edits
        # group["lr"] on this object edits the base optimizer's, and state_dict()
        # carries the base optimizer's buffers.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        # The saved weights w during a SAM step (not state: never checkpointed).
        self._saved: dict[torch.Tensor, torch.Tensor] = {}
        # The step begun by first_step(scaler=...), until second_step.
        self._scaled: _ScaledStep | None = None
        self._first_pass_key = _FirstPassGradients(self)

    # -- the two half steps -------------------------------------------------------
    def _params_with_grad(self) -> list[tuple[dict[str, Any], torch.Tensor]]:
        return [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def perturbation(self) -> dict[torch.Tensor, torch.Tensor]:
        """eps for every parameter with a gradient, from the current ``.grad`` (the
        gradient at w); see the module docstring. Does not modify anything."""
        pairs = self._params_with_grad()
        if not pairs:
            return {}
        scales = []
        for group, p in pairs:
            # ASAM's T = |w| + eta (Kwon et al. 2021, eq. 9); 1 for plain SAM.
            scales.append(p.abs() + group["eta"] if group["adaptive"] else None)
        # The ascent direction in u = eps / T coordinates is the dual-norm step of T g,
        # one global norm over all groups; each group then scales by its own rho.
        tg = [p.grad if s is None else s * p.grad for (_, p), s in zip(pairs, scales, strict=True)]
        unit = dual_norm_step(tg, self.p, 1.0)
        eps = {}
        for (group, p), s, u in zip(pairs, scales, unit, strict=True):
            e = u * group["rho"]
            eps[p] = e if s is None else e * s
        return eps

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, scaler: Any = None) -> None:
        """Move to w + eps, saving w; eps from the current gradients (those at w).

        ``scaler``: the ``torch.amp.GradScaler`` that scaled them. They are then unscaled
        here (do not call ``scaler.unscale_(opt)`` before), and w is kept (eps = 0) if
        they are not finite; finish the step with ``scaler.step(opt)`` or
        ``second_step()``, which skip the base step in that case.
        """
        if self._saved or self._scaled is not None:
            raise RuntimeError(
                "first_step called twice without second_step or unperturb"
                if self._scaled is None
                else "first_step called before the last scaled step was finished with "
                "scaler.step(opt) or opt.second_step(); " + SCALED_STEP_PATTERN
            )
        first_bad = None
        if scaler is not None and scaler.is_enabled():
            if _stage(scaler, self) not in ("READY", None):
                raise RuntimeError(
                    "first_step(scaler=scaler) unscales the gradient at w itself, but "
                    "scaler.unscale_(opt) or scaler.step(opt) already ran this iteration; "
                    "call scaler.unscale_(opt) only after the second backward, and "
                    "scaler.update() after every step; " + SCALED_STEP_PATTERN
                )
            if _stage(scaler, self._first_pass_key) not in ("READY", None):
                raise RuntimeError(
                    "scaler.update() was not called after the last SAM step; " + SCALED_STEP_PATTERN
                )
            scaler.unscale_(self._first_pass_key)
            first_bad = _nonfinite(
                scaler, self._first_pass_key, [p for _, p in self._params_with_grad()]
            )
        self._keep_first_gradient()
        for p, e in self.perturbation().items():
            self._saved[p] = p.detach().clone()
            if first_bad is not None:  # stay at w, without a sync, if g is not finite
                e = torch.where(first_bad.to(e.device), 0.0, e)
            p.add_(e)
        if scaler is not None:
            self._scaled = _ScaledStep(scaler, first_bad)
        if zero_grad:
            self.zero_grad()

    def _keep_first_gradient(self) -> None:
        """Called by ``first_step`` with the (unscaled) gradient at w in ``.grad``."""

    @torch.no_grad()
    def unperturb(self) -> None:
        """Return to the saved w, keeping the gradients (those at w + eps).

        Subclasses transform the gradient here (GSAM). Use it instead of
        ``second_step`` to clip or accumulate the gradient before the base step.
        After ``first_step(scaler=...)`` it also unscales the gradient (unless
        ``scaler.unscale_(opt)`` did), and the step must still end with
        ``scaler.step(opt)`` or ``second_step()`` (the base step if all was finite).
        """
        scaled = self._scaled
        if scaled is not None and not scaled.restored:
            if scaled.first_bad is not None and _stage(scaled.scaler, self) in ("READY", None):
                scaled.scaler.unscale_(self)
            scaled.restored = True
        for p, w in self._saved.items():
            p.copy_(w)
        self._saved.clear()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to w and let the base optimizer step with the gradient at w + eps.

        After ``first_step(scaler=...)``: the gradient is unscaled first (unless
        ``scaler.unscale_(opt)`` did), and the base step is skipped if the gradient in
        either pass was not finite (call ``scaler.update()`` after).
        """
        scaled = self._scaled
        self.unperturb()
        self._scaled = None
        if scaled is None or scaled.first_bad is None:
            self.base_optimizer.step()
        else:
            params = [p for _, p in self._params_with_grad()]
            bad = scaled.first_bad | _nonfinite(scaled.scaler, self, params).to(
                scaled.first_bad.device
            )
            if not bool(bad):  # one sync, as in GradScaler.step
                self.base_optimizer.step()
        # What a learning-rate scheduler's step-call check looks for: the descent step
        # happened even if the user never called step() itself.
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, *, scaler: Any = None
    ) -> Any:
        """One SAM step; the gradients at w must already be in ``.grad``.

        ``closure`` recomputes the loss and calls ``backward()`` (it runs with
        gradients enabled, at w + eps); its return value is returned. With
        ``scaler`` (a GradScaler, which scaled the gradients at w), the closure must
        call ``scaler.scale(loss).backward()``; call ``scaler.update()`` after.

        Without a closure it finishes a step begun by ``first_step(scaler=...)``: what
        ``scaler.step(opt)`` calls.
        """
        if getattr(self, "found_inf", None) is not None:  # set by GradScaler.step(opt, ...)
            return self._step_for_grad_scaler(closure)
        if closure is None:
            if self._scaled is not None:
                self.second_step()
                return None
            raise ValueError(
                "SAM needs a closure that recomputes the loss and calls backward(); "
                "or call first_step() and second_step() yourself"
            )
        self.first_step(zero_grad=True, scaler=scaler)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def _step_for_grad_scaler(self, closure: Callable[[], Any] | None) -> Any:
        """``scaler.step(opt, *args)``: finish a step begun by ``first_step(scaler=...)``,
        or refuse (back at w) what would leave a gradient scaled."""
        scaled = self._scaled
        if closure is None and scaled is not None and scaled.first_bad is not None:
            self.second_step()
            return None
        begun = bool(self._saved) or scaled is not None
        self._abort()
        # GradScaler deletes these only when step() returns.
        self.__dict__.pop("grad_scale", None)
        self.__dict__.pop("found_inf", None)
        if closure is not None:
            why = (
                "scaler.step(opt, closure) is not supported: SAM could not unscale the "
                "gradient at w + eps the closure makes, nor report it to the scaler if it "
                "is not finite"
            )
        elif begun:
            why = (
                "scaler.step(opt) after a first_step without an enabled scaler=: SAM "
                "cannot tell whether the gradient at w was unscaled (the step was "
                "abandoned, weights back at w)"
            )
        else:
            why = "scaler.step(opt) only finishes a SAM step begun by first_step(scaler=scaler)"
        raise RuntimeError(f"{why}; {SCALED_STEP_PATTERN}")

    @torch.no_grad()
    def _abort(self) -> None:
        """Back to w, forgetting the step in progress (gradients left as they are)."""
        for p, w in self._saved.items():
            p.copy_(w)
        self._saved.clear()
        self._scaled = None

    # -- groups, schedules, checkpoints ------------------------------------------
    def set_rho(self, rho: float) -> None:
        """Set rho in every parameter group (e.g. from :func:`rho_from_lr`)."""
        if not rho >= 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        for group in self.param_groups:
            group["rho"] = float(rho)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        self.base_optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its buffers, and the groups with rho etc.)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        # load_state_dict rebuilds the group dicts and the state: share them again.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class GSAM(SAM):
    """Surrogate-gap guided SAM (Zhuang et al. 2022, Algorithm 1).

    After the perturbed pass, the descent direction is g_sam - alpha * g_perp with
    g_perp = g - (g . g_sam / ||g_sam||^2) g_sam the component of the clean gradient g
    orthogonal to g_sam (one inner product over all parameters). alpha = 0 is SAM.
    The paper also schedules rho with the learning rate: see :func:`rho_from_lr` and
    :meth:`SAM.set_rho`.

    Args:
        alpha: weight of the orthogonal component (Zhuang et al. 2022 search
            alpha in [0, 0.3]; default 0.1 is within their reported best range).
        others: as :class:`SAM`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        p: float | str = 2,
        adaptive: bool = False,
        eta: float = 0.0,
        alpha: float = 0.1,
        **base_kwargs: Any,
    ):
        super().__init__(params, base_optimizer, rho, p, adaptive, eta, **base_kwargs)
        self.alpha = float(alpha)
        self._clean: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def _keep_first_gradient(self) -> None:
        self._clean = {p: p.grad.detach().clone() for _, p in self._params_with_grad()}

    def _abort(self) -> None:
        super()._abort()
        self._clean = {}

    @torch.no_grad()
    def unperturb(self) -> None:
        super().unperturb()
        clean, self._clean = self._clean, {}
        if self.alpha == 0 or not clean:
            return
        pairs = [(p.grad, g) for p, g in clean.items() if p.grad is not None]
        device = pairs[0][0].device
        dot = sum((gp * g).sum().to(device) for gp, g in pairs)
        sq = sum(gp.pow(2).sum().to(device) for gp, _ in pairs)
        coef = dot / (sq + NORM_GUARD)
        for gp, g in pairs:
            # g_sam - alpha (g - coef g_sam) = (1 + alpha coef) g_sam - alpha g
            perp = g - coef.to(gp.device) * gp
            gp.sub_(self.alpha * perp)


def rho_from_lr(lr: float, lr_max: float, lr_min: float, rho_max: float, rho_min: float) -> float:
    """GSAM's rho schedule (Zhuang et al. 2022, Sec. 5.1): rho proportional to the lr,

    rho_t = rho_min + (rho_max - rho_min) (lr_t - lr_min) / (lr_max - lr_min),

    and rho_max when the learning rate is constant (lr_max = lr_min).
    """
    if lr_max == lr_min:
        return float(rho_max)
    return float(rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min))
