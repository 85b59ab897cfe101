"""One run's model, optimizer and data, and one optimization step (SGD, SAM, ASAM, GSAM),
alone or data-parallel under ``torchrun``.

Reproducibility: the data order of epoch e is a permutation drawn from (seed, e), the
augmentation and dropout randomness of step t from (seed, t), the initialization from
seed, each with its own generator or a reseeded global state restored afterwards; the
learning rate is a function of the step (:func:`~sharpscope.train_config.learning_rate`).
So a run resumed from any resume point replays exactly the steps the uninterrupted run
would take: on the CPU its final weights are bit-identical.

Data parallelism (``torchrun --nproc_per_node N -m sharpscope train ...``):
every process joins the process group (:func:`sharpscope.distributed.init_from_environment`),
wraps the model in DistributedDataParallel and draws the same (seed, epoch) permutation;
process r takes the r-th contiguous slice of each global batch (``--batch-size`` is the
global batch B; slices of B/N, as a DistributedSampler would give, but bit-reproducible
and independent of N). Shards of unequal size are weighted so that the gradient is the
global batch's mean. SAM has two modes:

* default (``--m`` unset): the first-pass gradient is all-reduced, every process climbs
  to the same w + eps, the global-batch SAM step of a one-process run (Foret et al.
  2021, eq. 3) up to float summation order;
* ``--m M`` with M dividing B/N (``--m B/N`` is the usual choice): each process takes
  its own eps from its own examples and the first pass is not all-reduced -- the
  per-accelerator SAM of Foret et al. 2021 (Sec. 3; m-sharpness, Sec. 4.1), and
  one all-reduce per step instead of two. It equals a one-process run with the same
  ``--m``. DDP decides in the *forward* pass whether the backward all-reduces, so the
  unsynchronized first pass runs forward and backward inside ``no_sync()``.

The second pass is always all-reduced (with ``--m`` below B/N, GSAM or "loss"-mode
weight decay: one all-reduce of the averaged per-micro-batch gradients). BatchNorm
normalizes with each process's batch statistics (``--sync-bn``: over the global batch,
CUDA only); running statistics are updated in the clean pass only and are rank 0's
(DDP broadcasts them). Evaluation splits the eval batches over the processes and gives
the one-process numbers. Only rank 0 writes the run folder and prints; a resume
checkpoint is read by rank 0 and broadcast. (After ``torchrun`` spell ``--m`` as
``--m-sharpness``: torchrun's own parser takes ``--m`` for an abbreviation of its options.)
What differs from one process: BatchNorm batch statistics (without --sync-bn), dropout
masks (drawn per process) and float summation order.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .data import Dataset, augment_batch
from .devices import memory_bytes
from .errors import SharpscopeError
from .losses import class_hits, get_loss, logits_of
from .models import build_model, model_spec
from .objective import model_fits_data
from .sam import GSAM, SAM, bn_running_stats_frozen, rho_from_lr
from .train_config import (
    TrainConfig,
    learning_rate,
    lowest_lr,
    model_options,
    plan,
    resolve_amp,
)


@dataclass(frozen=True)
class Synchronization:
    """How the passes of one step meet DDP's all-reduce (the table in :meth:`Trainer.step`):
    ``local_eps``, each process (and micro-batch) climbs to its own w + eps; ``first`` and
    ``second``, DDP all-reduces the clean and the perturbed pass; ``by_hand``, neither
    does and the averaged micro-batch gradients are all-reduced once instead."""

    sam_step: bool
    local_eps: bool
    first: bool
    second: bool
    by_hand: bool


def synchronization(
    *,
    data_parallel: bool,
    sam_step: bool,
    m: int | None,
    batch: int,
    local_batch: int,
    gsam: bool,
    decay_in_loss: bool,
) -> Synchronization:
    """The :class:`Synchronization` of a step: ``batch`` is the global batch,
    ``local_batch`` this process's share, ``m`` the m-sharpness micro-batch (None: the
    whole batch). Local eps with more than one micro-batch per process to average, or
    with a term DDP cannot average (GSAM's correction mixes a micro-batch's two
    gradients; "loss"-mode decay at w + eps differs between processes), is all-reduced
    by hand."""
    local_eps = sam_step and m is not None and m < batch
    micro_batches = -(-local_batch // m) if local_eps else 1
    by_hand = data_parallel and local_eps and (micro_batches > 1 or gsam or decay_in_loss)
    return Synchronization(sam_step, local_eps, not local_eps, not by_hand, by_hand)


# -- seeds --------------------------------------------------------------------------------
_ORDER, _AUGMENT, _DROPOUT, _INIT = 1, 2, 3, 4


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream named by ``keys`` (e.g. (ORDER, epoch)), from the
    run seed, via NumPy's SeedSequence hashing (independent streams per key)."""
    words = np.random.SeedSequence(seed, spawn_key=keys).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _to_cpu(obj: Any) -> Any:
    """Tensors in a nested optimizer / scaler state moved to the CPU (for saving)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


# -- the trainer ----------------------------------------------------------------------------
def make_optimizer(c: TrainConfig, params) -> torch.optim.Optimizer:
    """SGD, SAM or GSAM over ``params`` with the options of ``c`` (heavy-ball or Nesterov
    momentum, weight decay in the base optimizer unless it goes in the loss)."""
    base = {
        "lr": c.lr,
        "momentum": c.momentum,
        "nesterov": c.nesterov,
        # In "loss" mode the decay is added to each pass's gradient instead (_backward).
        "weight_decay": c.weight_decay if c.weight_decay_mode == "optimizer" else 0.0,
    }
    if c.optimizer == "sgd":
        return torch.optim.SGD(params, **base)
    sam = {"rho": c.rho, "p": c.sam_p, "adaptive": c.adaptive, "eta": c.eta}
    if c.optimizer == "sam":
        return SAM(params, torch.optim.SGD, **sam, **base)
    return GSAM(params, torch.optim.SGD, **sam, alpha=c.gsam_alpha, **base)


class Trainer:
    """Model, optimizer and data of one run, and the optimization step.

    Inside a process group of N > 1 processes the model is wrapped in
    DistributedDataParallel (``self.ddp``; ``self.model`` stays the bare module) and
    :meth:`batch` returns this process's slice of the global batch. ``dtype`` (tests)
    converts the model and the data before DDP sees them.
    """

    def __init__(
        self,
        c: TrainConfig,
        dataset: Dataset,
        device: torch.device,
        *,
        dtype: torch.dtype | None = None,
    ):
        self.c = dataclasses.replace(c, amp=resolve_amp(c.amp, device))
        c = self.c
        self.device = device
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.dataset = dataset.to(device)
        if dtype is not None:
            self.dataset.train_x = self.dataset.train_x.to(dtype)
            self.dataset.test_x = self.dataset.test_x.to(dtype)
        self.plan = plan(c, dataset, self.world)
        # This process's contiguous slice [lo, hi) of every global batch (the split of
        # Objective and DistributedSampler: sizes differ by at most one).
        B = self.plan.batch_size
        self.shard = (B * self.rank // self.world, B * (self.rank + 1) // self.world)
        # A synchronized pass averages the processes' mean losses; weighting each by
        # N * (its examples) / B makes that the global batch's mean when shards differ.
        self.shard_weight = self.world * (self.shard[1] - self.shard[0]) / B
        self.loss_fn = get_loss(c.loss, c.label_smoothing)
        self.spec = model_spec(
            c.model, dataset.input_shape, dataset.num_classes, **model_options(c)
        )
        # Accuracy is a count of arg-max hits on class indices; none for regression.
        self.classes = dataset.task == "classification"
        torch.manual_seed(derive_seed(c.seed, _INIT))  # inside train()'s fork_rng
        # Training holds about four copies of the weights (w, its gradient, momentum,
        # SAM's saved w): refused before allocating if they would not fit the device.
        memory = memory_bytes(device)
        self.model = build_model(self.spec, max_bytes=memory // 4 if memory else None)
        if dtype is not None:
            self.model.to(dtype)
        self.model.to(device)
        self._check_fits_data()
        self.model.train()
        self.ddp: DistributedDataParallel | None = None
        if self.world > 1:
            if c.sync_bn:
                if device.type != "cuda":
                    raise SharpscopeError(
                        "--sync-bn needs CUDA: PyTorch's SyncBatchNorm has no CPU kernel"
                    )
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            # DDP's default buffer sync: rank 0's BatchNorm running statistics are
            # copied to every process before a forward pass (and before evaluation).
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[device] if device.type == "cuda" else None
            )
        self.net: nn.Module = self.ddp if self.ddp is not None else self.model
        self.optimizer = make_optimizer(c, self.model.parameters())
        # The optimizer that steps (SAM and GSAM wrap one; SGD is its own).
        self.base = getattr(self.optimizer, "base_optimizer", self.optimizer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(device.type) if c.amp == "fp16" else None
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.amp)
        self._order: tuple[int, torch.Tensor | None] = (-1, None)

    def _check_fits_data(self) -> None:
        """One forward pass and loss on two training examples, in eval mode: a model that
        cannot take the data (the user's own, most of all) is refused in one line before
        the run starts, not with a traceback in its first step."""
        x, y = self.dataset.train_x[:2], self.dataset.train_y[:2]
        self.model.eval()
        with torch.no_grad(), model_fits_data():
            self.loss_fn(self.model(x), y)

    # one forward pass under autocast; the loss in float32
    def _forward(
        self, x: torch.Tensor, y: torch.Tensor, model: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.net if model is None else model
        if self.autocast_dtype is None:
            out = model(x)
            return out, self.loss_fn(out, y)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            out = model(x)
        out = logits_of(out).float()  # a Hugging Face model's output: its logits
        return out, self.loss_fn(out, y)

    def _synced(self, sync: bool) -> contextlib.AbstractContextManager:
        """Where DDP should not all-reduce: ``no_sync()`` around forward *and* backward
        (DDP decides in the forward pass; davda54/sam issue 78)."""
        if self.ddp is None or sync:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def _backward(self, loss: torch.Tensor, bad: torch.Tensor, synced: bool) -> torch.Tensor:
        """Gradients of ``loss`` into ``.grad`` (which must be empty), unscaled and with
        the decay of "loss" mode added. Returns ``bad`` or'ed with "non-finite".
        ``synced``: DDP all-reduces this pass (uneven shards are weighted then)."""
        if synced and self.shard_weight != 1.0:
            loss = loss * self.shard_weight
        if self.scaler is None:
            loss.backward()
        else:
            scale = self.scaler.get_scale()
            self.scaler.scale(loss).backward()
            # Unscale every pass (the gradient at w sets eps, GSAM mixes both passes);
            # the second pass must not be judged on the first's scale.
            inv = 1.0 / scale
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(inv)
                    bad = bad | ~torch.isfinite(p.grad).all()
        if self.c.weight_decay and self.c.weight_decay_mode == "loss":
            # grad of (wd / 2) ||w||^2 at the current point (w + eps in the second pass),
            # as the official JAX SAM code's L2 term in the loss (so it enters eps).
            for p in self.params:
                if p.grad is not None:
                    p.grad.add_(p.detach(), alpha=self.c.weight_decay)
        return bad

    def _dropout_seed(self, step: int, k: int) -> int:
        if self.world == 1:
            return derive_seed(self.c.seed, _DROPOUT, step, k)
        # Each process draws its own masks (the same seed everywhere would repeat the
        # masks of rank 0's examples on every other rank's).
        return derive_seed(self.c.seed, _DROPOUT, step, k, self.rank)

    def step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, ...]:
        """One optimization step on the batch (x, y) (this process's slice under DDP).

        Returns (sum of clean-pass losses over the examples, number correct, whether the
        step was skipped) as tensors, summed over the processes under DDP.

        Under DDP, which passes are all-reduced:

        ===============================  ===========  ============================
        mode                             first pass   second pass
        ===============================  ===========  ============================
        SGD / plain step                 DDP          --
        SAM, GSAM, --m unset (or = B)    DDP          DDP
        SAM, --m = B/N                   local        DDP
        --m < B/N, or GSAM or "loss"     local        local, then one all-reduce
        decay with --m                                of the averaged gradient
        ===============================  ===========  ============================

        (:func:`synchronization` decides, from the options.)
        """
        c = self.c
        sam = self.optimizer if isinstance(self.optimizer, SAM) else None
        n = len(y)
        sync = synchronization(
            data_parallel=self.ddp is not None,
            sam_step=sam is not None and step % c.sam_interval == 0,
            m=c.m,
            batch=self.plan.batch_size if self.ddp is not None else n,  # the global batch
            local_batch=n,
            gsam=c.optimizer == "gsam",
            decay_in_loss=c.weight_decay > 0 and c.weight_decay_mode == "loss",
        )
        use_sam, by_hand = sam is not None and sync.sam_step, sync.by_hand
        sync_first, sync_second = sync.first, sync.second
        B = self.plan.batch_size if self.ddp is not None else n
        m = c.m if sync.local_eps else n
        chunks = [(x[i : i + m], y[i : i + m]) for i in range(0, n, m)]
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        total: list[torch.Tensor] | None = None
        self.base.zero_grad(set_to_none=True)
        for k, (xk, yk) in enumerate(chunks):
            # Same dropout masks in both passes of a micro-batch: the perturbed pass
            # evaluates the same sampled loss, and rho = 0 reproduces SGD exactly.
            dropout_seed = self._dropout_seed(step, k)
            torch.manual_seed(dropout_seed)
            with self._synced(sync_first):
                out, loss = self._forward(xk, yk)  # clean pass: BN statistics update here
                bad = self._backward(loss, bad, sync_first)
            loss_sum += loss.detach() * len(yk)
            hits = class_hits(out, yk) if self.classes else None
            if hits is not None:
                correct += hits
            if not use_sam:
                break
            sam.first_step(zero_grad=True)
            torch.manual_seed(dropout_seed)
            with self._synced(sync_second), bn_running_stats_frozen(self.model):
                _, loss_p = self._forward(xk, yk)
                bad = self._backward(loss_p, bad, sync_second)
            sam.unperturb()  # back to w, gradient at w + eps (GSAM-corrected) kept
            if len(chunks) > 1 or by_hand:  # m-sharpness: average the micro-batches' gradients
                weight = len(yk) / B
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
                if total is None:
                    total = [g * weight for g in grads]
                else:
                    for t, g in zip(total, grads, strict=True):
                        t.add_(g, alpha=weight)
                self.base.zero_grad(set_to_none=True)
        if total is not None:
            if by_hand:  # the only all-reduce of this step
                distributed.all_reduce_sum_(total)
            for p, t in zip(self.params, total, strict=True):
                p.grad = t
        if self.ddp is not None:
            # One small all-reduce: the logged totals are the global batch's, and the
            # processes agree on skipping (a local first pass can overflow on one only).
            totals = torch.stack([loss_sum.double(), correct.double(), bad.double()])
            distributed.all_reduce_sum_([totals])
            loss_sum, correct, bad = totals[0], totals[1].long(), totals[2] > 0
        skipped = self._descend(bad)
        return loss_sum, correct, skipped

    def _descend(self, bad: torch.Tensor) -> torch.Tensor:
        """Clip the final gradient and let the base optimizer step (through the scaler
        under fp16, which skips the step and backs off if any pass was non-finite)."""
        c = self.c
        if self.scaler is None:
            if c.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)
            self.base.step()
            return torch.zeros((), dtype=torch.bool, device=self.device)
        # Hand the (unscaled) gradient back to the GradScaler in its scaled form so that
        # it records the inf check, skips and backs off as usual. The scale is a power
        # of two, so multiplying and its unscale_ are exact.
        scale = self.scaler.get_scale()
        grads = [p.grad for p in self.params if p.grad is not None]
        for g in grads:
            g.mul_(scale)
        if grads:  # a non-finite first pass poisons the gradient the scaler checks
            grads[0].view(-1)[:1].add_(torch.where(bad, torch.inf, 0.0))
        self.scaler.unscale_(self.base)
        if c.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)
        self.scaler.step(self.base)
        self.scaler.update()
        # The scaler backs off exactly when it skipped the step.
        return torch.tensor(self.scaler.get_scale() < scale, device=self.device)

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float | None]:
        """Mean loss and accuracy (None for regression) on a whole split, in eval mode
        (mode restored).

        Under DDP the eval batches are dealt out to the processes (batch j to rank
        j mod N) and their sums gathered; every process then adds them up in batch order,
        so all get the numbers one process gets (the same batches, summed the same way).
        """
        x, y = self.dataset.split(split)
        size = self.c.eval_batch_size
        starts = list(range(0, len(y), size))
        losses = torch.zeros(len(starts), dtype=torch.float64, device=self.device)
        correct = torch.zeros(len(starts), dtype=torch.int64, device=self.device)
        distributed.broadcast_buffers(self.model)  # rank 0's BatchNorm statistics
        was_training = self.model.training
        self.model.eval()
        try:
            for j in range(self.rank, len(starts), self.world):
                xb, yb = x[starts[j] : starts[j] + size], y[starts[j] : starts[j] + size]
                out, loss = self._forward(xb, yb, self.model)
                losses[j] = loss.double() * len(yb)
                hits = class_hits(out, yb) if self.classes else None
                if hits is not None:
                    correct[j] = hits
        finally:
            self.model.train(was_training)
        distributed.all_reduce_sum_([losses, correct])  # one nonzero term each: exact
        total = 0.0
        for value in losses.tolist():  # in batch order, as one process sums them
            total += value
        accuracy = int(correct.sum().item()) / len(y) if self.classes else None
        return {"loss": total / len(y), "accuracy": accuracy}

    def batch(self, epoch: int, index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of epoch ``epoch`` (order from (seed, epoch)), augmented with
        randomness from (seed, step); under DDP this process's slice of it."""
        B = self.plan.batch_size
        if self._order[0] != epoch:
            g = torch.Generator().manual_seed(derive_seed(self.c.seed, _ORDER, epoch))
            self._order = (epoch, torch.randperm(self.plan.n_train, generator=g))
        idx = self._order[1][index * B : (index + 1) * B]
        lo, hi = self.shard
        augment = self.dataset.augment
        if augment is None:
            idx = idx[lo:hi]
        idx = idx.to(self.device)
        x, y = self.dataset.train_x[idx], self.dataset.train_y[idx]
        if augment is not None:
            # The whole global batch is augmented (cheap next to a step) and then sliced:
            # every example gets the random crop and flip a one-process run gives it.
            g = torch.Generator().manual_seed(derive_seed(self.c.seed, _AUGMENT, step))
            x = augment_batch(x, augment, g)
            x, y = x[lo:hi], y[lo:hi]
        return x, y

    def set_lr(self, step: int) -> float:
        lr = learning_rate(self.c, step, self.plan.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if isinstance(self.optimizer, GSAM) and self.c.gsam_rho_min is not None:
            rho = rho_from_lr(lr, self.c.lr, lowest_lr(self.c), self.c.rho, self.c.gsam_rho_min)
            self.optimizer.set_rho(min(max(rho, self.c.gsam_rho_min), self.c.rho))
        return lr

    def track(self, step: int, tracked: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        """Top Hessian eigenvalue (and worst-case l2 sharpness) on the tracking subset."""
        from .hessian import hessian_eigenvalues

        record: dict[str, Any] = {"kind": "track", "step": step}
        # Every process calls this: under DDP the analyses shard the tracked examples
        # and all-reduce (Objective), on rank 0's BatchNorm statistics.
        distributed.broadcast_buffers(self.model)
        # The training loss without the decay term; eval mode (BN running statistics).
        result = hessian_eigenvalues(
            self.model, tracked, k=1, loss_fn=self.loss_fn, seed=self.c.seed
        )
        record["hessian_top"] = float(result.eigenvalues[0])
        if self.c.track_sharpness:
            from .sharpness import sharpness

            s = sharpness(
                self.model,
                tracked,
                rho=self.c.rho,
                loss_fn=self.loss_fn,
                norm="l2",
                seed=self.c.seed,
            )
            record["sharpness"] = float(s.value)
            record["sharpness_rho"] = self.c.rho
        record["track_samples"] = len(tracked[1])
        return record
