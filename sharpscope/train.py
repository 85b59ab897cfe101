"""The training loop: SGD, SAM, ASAM and GSAM on a sharpscope data set, with resume.

One file, read top to bottom (in the spirit of nanoGPT): configuration (:class:`TrainConfig`),
the run folder, one optimization step (:meth:`_Trainer.step`), the epoch loop
(:func:`train`). A run folder ``OUT`` holds::

    config.json            the resolved TrainConfig
    metrics.jsonl          one JSON object per line: {"kind": "epoch" | "track" | "final", ...}
    checkpoint.pt          the final model (checkpoint.save_checkpoint format)
    resume.pt              the same plus "resume": optimizer / scaler state, step, epoch, ...
    trajectory/step_NNNNNNN.pt   intermediate models with --save-every (no resume state)

Reproducibility: the data order of epoch e is a permutation drawn from (seed, e), the
augmentation and dropout randomness of step t from (seed, t), the initialization from
seed, each with its own generator or a reseeded global state restored afterwards. The
learning rate is a function of the step. So a run resumed from any resume checkpoint
replays exactly the steps the uninterrupted run would take: on the CPU its final
weights are bit-identical.

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
import json
import math
import os
import signal
import sys
import time
import typing
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import distributed
from .checkpoint import check_trusted_model, read_checkpoint, save_checkpoint
from .checks import fits_annotation, is_real, is_whole
from .data import DATASETS, LOCATION_KEYS, Dataset, augment_batch, data_spec, load_dataset
from .devices import memory_bytes, resolve_device
from .errors import SharpscopeError, first_line
from .files import write_json, write_jsonl
from .losses import LOSSES, correct_count, get_loss
from .models import DEFAULT_MODEL, build_model, check_model_name, check_weights_fit, model_spec
from .runfolder import TRAJECTORY, RunFolder, StopRequest, stop_on_signals
from .sam import GSAM, SAM, bn_running_stats_frozen, parse_p, rho_from_lr

OPTIMIZERS = ("sgd", "sam", "gsam")
SCHEDULES = ("constant", "cosine", "step")
AMP_MODES = ("auto", "none", "bf16", "fp16")
WEIGHT_DECAY_MODES = ("optimizer", "loss")
# "step" schedule: multiply the lr by 0.2 at 30%, 60% and 80% of training, the WRN
# schedule (Zagoruyko & Komodakis 2016, Sec. 3: epochs 60, 120, 160 of 200).
STEP_MILESTONES = (0.3, 0.6, 0.8)
STEP_GAMMA = 0.2
# A resume checkpoint at every epoch end, but at most this often in wall time, so that
# full-batch runs (one step per epoch) do not spend their time writing; step-based
# checkpoints (--checkpoint-every) are not throttled.
RESUME_MIN_INTERVAL_S = 10.0
METRICS_MIN_INTERVAL_S = 2.0
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class TrainConfig:
    """Every option of ``sharpscope train``; the defaults train a small CNN with SAM on
    scikit-learn's digits to >= 95% test accuracy in seconds on one CPU core."""

    # data (data.data_spec)
    data: str = "digits"
    data_dir: str | None = None
    download: bool = False
    train_subset: int | None = None
    # model (models.model_spec); None = the registry default for the data set (cnn for digits)
    model: str | None = None
    width: int | None = None
    depth: int | None = None
    activation: str | None = None
    # optimizer
    optimizer: str = "sam"
    rho: float = 0.05  # Foret et al. 2021, the CIFAR default (Sec. 3.1)
    sam_p: float | str = 2.0  # the paper's l2 ball; "inf" or any p >= 1
    adaptive: bool = False  # ASAM (Kwon et al. 2021)
    eta: float = 0.0  # ASAM offset; 0 matches davda54/sam
    # m-sharpness micro-batch size; None = the whole (global) batch. Under torchrun with
    # N processes, M must divide B/N: each process then keeps its own eps (no first
    # all-reduce); None (or B) all-reduces the first pass (one eps for the global batch).
    m: int | None = None
    sam_interval: int = 1  # SAM step every k steps, plain steps between (1 = always)
    gsam_alpha: float = 0.1  # GSAM's alpha (Zhuang et al. 2022 search [0, 0.3])
    gsam_rho_min: float | None = None  # GSAM rho at the lowest lr; None = constant rho
    # lr 0.1 with batch 32 for 20 epochs: tuned on digits (seeds 0-4 reach 97.6-98.9% test
    # accuracy; lr 0.05 reaches 95.6-97.8%, lr 0.2 at batch 64 can stall at chance).
    lr: float = 0.1
    momentum: float = 0.9  # heavy-ball 0.9, the SAM paper's (Foret et al. 2021, App. B)
    nesterov: bool = False
    weight_decay: float = 5e-4  # Foret et al. 2021, App. B (CIFAR)
    weight_decay_mode: str = "optimizer"  # base optimizer at w (PyTorch ports) | "loss" (JAX)
    label_smoothing: float = 0.0
    schedule: str = "cosine"  # cosine to 0, as in Foret et al. 2021
    warmup: int = 0  # linear warmup steps
    epochs: int | None = None  # None: DEFAULT_EPOCHS unless steps is set
    steps: int | None = None  # optimization steps; overrides epochs
    # The global batch (split over the processes under torchrun), or "full" (gradient
    # descent); digits: 42 steps per epoch.
    batch_size: int | str = 32
    grad_clip: float | None = None  # max l2 norm of the gradient at w + eps
    loss: str = "ce"
    seed: int = 0
    device: str = "auto"
    # "auto": bf16 autocast on CUDA (bf16 keeps fp32's exponent range, so no
    # loss scaling: Kalamkar et al. 2019), none on the CPU.
    amp: str = "auto"
    sync_bn: bool = False  # under torchrun: SyncBatchNorm, statistics of the global batch
    eval_every: int = 1  # evaluate the test set every N epochs
    eval_batch_size: int = 1024
    # tracking: top Hessian eigenvalue every N steps on a fixed training subset
    track_every: int | None = None
    track_sharpness: bool = False
    track_samples: int = 512
    # checkpoints
    save_every: int | None = None  # trajectory checkpoints every N steps
    checkpoint_every: int | None = None  # resume checkpoint every N steps


# The number of epochs when neither epochs nor steps is given: the default digits run
# passes 95% test accuracy with margin (97.6-98.9% over seeds 0-4, ~4 s on one core).
DEFAULT_EPOCHS = 20


# Options that say where the run happens, not what it is: a resumed run may change them,
# and a file's values are never used for them (the data folder and the download flag
# come from the user's own options).
LOCATION_FIELDS = ("device", *LOCATION_KEYS)


def config_from_dict(values: Any, source: str = "training options") -> TrainConfig:
    """A :class:`TrainConfig` from a dict (e.g. read from a resume point): unknown keys
    and values of the wrong type are refused in one line."""
    if not isinstance(values, dict):
        raise SharpscopeError(f"{source}: the training configuration is not a dict")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(str(k) for k in set(values) - known)
    if unknown:
        raise SharpscopeError(f"{source}: unknown training options: {', '.join(unknown)}")
    hints = typing.get_type_hints(TrainConfig)
    for name, value in values.items():
        if not fits_annotation(value, hints[name]):
            raise SharpscopeError(
                f"{source}: training option {name} = {value!r} is of a wrong type"
            )
    return TrainConfig(**values)


class NoResumePoint(SharpscopeError):
    """The run folder holds no resume point (resume.pt) to continue from."""


def load_run_config(
    out: str, *, model: str | None = None, trust_code: bool = False, quiet: bool = False
) -> TrainConfig:
    """The configuration of the run in folder ``out``, from its resume point.

    First finishes what a killed process left half done in the folder (under its
    lock; see :mod:`sharpscope.runfolder`). The data folder and download flag the
    resume point records are dropped (give your own); a model factory it names is
    refused unless ``model`` names the same one or ``trust_code``. Raises
    :class:`NoResumePoint` if there is none.
    """
    if not os.path.isdir(out):
        raise NoResumePoint(f"{out}: no resume checkpoint (resume.pt) to continue from")
    with RunFolder(out, say=_silent if quiet else _print).locked() as folder:
        if not folder.resumable():
            raise NoResumePoint(f"{out}: no resume checkpoint (resume.pt) to continue from")
        path = os.path.join(out, "resume.pt")
        saved = read_checkpoint(path)
    config = dataclasses.replace(
        config_from_dict(saved.get("config"), path), data_dir=None, download=False
    )
    if config.model is not None:
        check_trusted_model(config.model, path, named=model, trust_code=trust_code)
    resolve_config(config)  # registry data sets, known choices, ranges: refused on read
    return config


# -- configuration checks ---------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """What a resolved configuration implies: sizes and step counts."""

    n_train: int
    batch_size: int  # the global batch
    steps_per_epoch: int
    total_steps: int
    epochs: int  # epochs started (the last may be partial in step mode)
    world_size: int = 1  # processes sharing each batch


def resolve_config(config: TrainConfig, dataset: Dataset | None = None) -> TrainConfig:
    """Check every option and fill in the defaults that depend on others.

    With ``dataset``, also the checks that need its size and the number of processes
    (:func:`sharpscope.distributed.world_size`). Raises :class:`SharpscopeError` with
    one clear message for bad input.
    """
    c = dataclasses.replace(config)
    _choice("data", c.data, DATASETS)
    _choice("optimizer", c.optimizer, OPTIMIZERS)
    _choice("schedule", c.schedule, SCHEDULES)
    _choice("amp", c.amp, AMP_MODES)
    _choice("loss", c.loss, LOSSES)
    _choice("weight-decay-mode", c.weight_decay_mode, WEIGHT_DECAY_MODES)
    floats = ("rho", "eta", "gsam_alpha", "gsam_rho_min", "lr", "momentum", "weight_decay")
    for name in (*floats, "label_smoothing", "grad_clip"):
        value = getattr(c, name)  # NaN and inf would only show up as a diverged run
        # Beyond float32's range the optimizer cannot even apply the value.
        if value is not None and not abs(value) <= FLOAT32_MAX:
            option = "--" + name.replace("_", "-")
            raise SharpscopeError(
                f"{option} must be a finite number in float32's range, got {value}"
            )
    if not c.rho >= 0:
        raise SharpscopeError(f"--rho must be >= 0, got {c.rho}")
    try:
        p = parse_p(c.sam_p)
    except ValueError as exc:
        raise SharpscopeError(f"--sam-p: {exc}") from None
    c.sam_p = "inf" if math.isinf(p) else p
    if c.eta < 0:
        raise SharpscopeError(f"--eta must be >= 0, got {c.eta}")
    if c.gsam_rho_min is not None and not 0 <= c.gsam_rho_min <= c.rho:
        raise SharpscopeError(f"--gsam-rho-min must be in [0, rho={c.rho}], got {c.gsam_rho_min}")
    for name in ("m", "steps", "epochs", "track_every", "save_every", "checkpoint_every"):
        value = getattr(c, name)
        if value is not None and value < 1:
            raise SharpscopeError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("sam_interval", "eval_every", "eval_batch_size", "track_samples"):
        if getattr(c, name) < 1:
            raise SharpscopeError(f"--{name.replace('_', '-')} must be >= 1")
    if c.track_sharpness and c.track_every is None:
        raise SharpscopeError("--track-sharpness needs --track-every N (how often to track)")
    if c.m is not None and c.optimizer == "sgd":
        raise SharpscopeError("--m (m-sharpness) applies to --optimizer sam or gsam")
    if not c.lr > 0:
        raise SharpscopeError(f"--lr must be positive, got {c.lr}")
    if c.momentum < 0 or c.weight_decay < 0 or c.warmup < 0:
        raise SharpscopeError("--momentum, --weight-decay and --warmup must be >= 0")
    if c.nesterov and c.momentum == 0:
        raise SharpscopeError("--nesterov needs --momentum > 0")
    if not 0 <= c.label_smoothing < 1:
        raise SharpscopeError(f"--label-smoothing must be in [0, 1), got {c.label_smoothing}")
    if c.grad_clip is not None and not c.grad_clip > 0:
        raise SharpscopeError(f"--grad-clip must be positive, got {c.grad_clip}")
    if not 0 <= c.seed < 2**63:
        raise SharpscopeError(f"--seed must be in 0 .. 2^63 - 1, got {c.seed}")
    if isinstance(c.batch_size, str):
        if c.batch_size != "full":
            try:
                c.batch_size = int(c.batch_size)
            except ValueError:
                raise SharpscopeError(
                    f"--batch-size must be a positive integer or 'full', got {c.batch_size!r}"
                ) from None
    if isinstance(c.batch_size, int) and c.batch_size < 1:
        raise SharpscopeError(f"--batch-size must be positive, got {c.batch_size}")
    if c.steps is not None and c.epochs is not None:
        raise SharpscopeError("give --epochs or --steps, not both")
    if c.steps is None and c.epochs is None:
        c.epochs = DEFAULT_EPOCHS
    if c.model is None:
        c.model = DEFAULT_MODEL[c.data]
    check_model_name(c.model)
    get_loss(c.loss, c.label_smoothing)  # refuses label smoothing with mse
    if dataset is not None:
        _plan(c, dataset, distributed.world_size())  # size checks that need the data
    return c


def resolve_amp(amp: str, device: torch.device) -> str:
    """The mixed-precision mode ``amp`` means on ``device``: "auto" is bf16 on CUDA and
    none elsewhere; the others stand for themselves."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "none"
    return amp


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SharpscopeError(f"unknown --{name} {value!r}: choose one of {', '.join(choices)}")


def _plan(c: TrainConfig, dataset: Dataset, world: int = 1) -> _Plan:
    n = len(dataset.train_y)
    batch = n if c.batch_size == "full" else int(c.batch_size)
    if batch > n:
        raise SharpscopeError(
            f"--batch-size {batch} exceeds the {n} training examples (use --batch-size full)"
        )
    if c.m is not None and c.m > batch:
        raise SharpscopeError(f"--m {c.m} exceeds the batch size {batch}")
    if batch < world:
        raise SharpscopeError(f"--batch-size {batch} is smaller than the {world} processes")
    if world > 1 and c.m is not None and c.m < batch:
        # Micro-batches must not straddle two processes: each process's eps comes from
        # its own examples, and the run then equals a one-process run with this --m.
        per = batch // world
        if batch % world or per % c.m:
            hint = f"; --m {per} gives each process its own eps" if batch % world == 0 else ""
            raise SharpscopeError(
                f"--m {c.m} under {world} processes: --batch-size {batch} must split evenly "
                f"over the processes and M must divide the per-process batch{hint} "
                "(or leave --m unset for one eps per global batch)"
            )
    # The last partial batch is dropped (a fresh permutation every epoch still shows
    # every example): a batch of one would break BatchNorm in train mode.
    per_epoch = n // batch
    total = c.steps if c.steps is not None else c.epochs * per_epoch
    epochs = math.ceil(total / per_epoch)
    return _Plan(n, batch, per_epoch, total, epochs, world)


def learning_rate(c: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of step ``step`` (0-based) out of ``total_steps``.

    Linear warmup over ``c.warmup`` steps from lr / warmup to lr, then ``constant``,
    ``cosine`` (annealed to 0 at the last step; Loshchilov & Hutter 2017, no restarts)
    or ``step`` (x0.2 at 30%, 60%, 80%; Zagoruyko & Komodakis 2016).
    """
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    span = max(total_steps - c.warmup, 1)
    progress = min((step - c.warmup) / span, 1.0)
    if c.schedule == "constant":
        return c.lr
    if c.schedule == "cosine":
        return 0.5 * c.lr * (1.0 + math.cos(math.pi * progress))
    return c.lr * STEP_GAMMA ** sum(progress >= m for m in STEP_MILESTONES)


def _lowest_lr(c: TrainConfig) -> float:
    """The schedule's lowest learning rate after warmup (GSAM's lr_min)."""
    if c.schedule == "constant":
        return c.lr
    if c.schedule == "cosine":
        return 0.0
    return c.lr * STEP_GAMMA ** len(STEP_MILESTONES)


# -- seeds --------------------------------------------------------------------------------
_ORDER, _AUGMENT, _DROPOUT, _INIT = 1, 2, 3, 4


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the stream named by ``keys`` (e.g. (ORDER, epoch)), from the
    run seed, via NumPy's SeedSequence hashing (independent streams per key)."""
    words = np.random.SeedSequence(seed, spawn_key=keys).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class Diverged(SharpscopeError):
    """The training loss became NaN or infinite: the run is worth nothing."""


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
class _Trainer:
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
        self.plan = _plan(c, dataset, self.world)
        # This process's contiguous slice [lo, hi) of every global batch (the split of
        # Objective and DistributedSampler: sizes differ by at most one).
        B = self.plan.batch_size
        self.shard = (B * self.rank // self.world, B * (self.rank + 1) // self.world)
        # A synchronized pass averages the processes' mean losses; weighting each by
        # N * (its examples) / B makes that the global batch's mean when shards differ.
        self.shard_weight = self.world * (self.shard[1] - self.shard[0]) / B
        self.loss_fn = get_loss(c.loss, c.label_smoothing)
        self.spec = model_spec(
            c.model,
            dataset.input_shape,
            dataset.num_classes,
            width=c.width,
            depth=c.depth,
            activation=c.activation,
        )
        torch.manual_seed(derive_seed(c.seed, _INIT))  # inside train()'s fork_rng
        # Training holds about four copies of the weights (w, its gradient, momentum,
        # SAM's saved w): refused before allocating if they would not fit the device.
        memory = memory_bytes(device)
        self.model = build_model(self.spec, max_bytes=memory // 4 if memory else None)
        if dtype is not None:
            self.model.to(dtype)
        self.model.to(device)
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
        base_kwargs: dict[str, Any] = {
            "lr": c.lr,
            "momentum": c.momentum,
            "nesterov": c.nesterov,
            # In "loss" mode the decay is added to each pass's gradient instead (_backward).
            "weight_decay": c.weight_decay if c.weight_decay_mode == "optimizer" else 0.0,
        }
        params = self.model.parameters()
        sam_kwargs = {"rho": c.rho, "p": c.sam_p, "adaptive": c.adaptive, "eta": c.eta}
        if c.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(params, **base_kwargs)
            self.base = self.optimizer
        elif c.optimizer == "sam":
            self.optimizer = SAM(params, torch.optim.SGD, **sam_kwargs, **base_kwargs)
            self.base = self.optimizer.base_optimizer
        else:
            self.optimizer = GSAM(
                params, torch.optim.SGD, **sam_kwargs, alpha=c.gsam_alpha, **base_kwargs
            )
            self.base = self.optimizer.base_optimizer
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(device.type) if c.amp == "fp16" else None
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.amp)
        self._order: tuple[int, torch.Tensor | None] = (-1, None)

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
        out = out.float()
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
        """
        c = self.c
        sam = self.optimizer if isinstance(self.optimizer, SAM) else None
        use_sam = sam is not None and step % c.sam_interval == 0
        n = len(y)
        B = self.plan.batch_size if self.ddp is not None else n  # the global batch
        local_eps = use_sam and c.m is not None and c.m < B
        m = c.m if local_eps else n
        chunks = [(x[i : i + m], y[i : i + m]) for i in range(0, n, m)]
        # Local eps with more than one term per process to average (micro-batches), or a
        # term DDP cannot average: GSAM's correction (it mixes a micro-batch's two
        # gradients) and "loss"-mode decay at w + eps (eps differs between processes).
        by_hand = (
            self.ddp is not None
            and local_eps
            and (
                len(chunks) > 1
                or c.optimizer == "gsam"
                or (c.weight_decay > 0 and c.weight_decay_mode == "loss")
            )
        )
        sync_first, sync_second = not local_eps, not by_hand
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
            correct += correct_count(out.detach(), yk)
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
    def evaluate(self, split: str) -> dict[str, float]:
        """Mean loss and accuracy on a whole split, in eval mode (mode restored).

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
                correct[j] = correct_count(out, yb)
        finally:
            self.model.train(was_training)
        distributed.all_reduce_sum_([losses, correct])  # one nonzero term each: exact
        total = 0.0
        for value in losses.tolist():  # in batch order, as one process sums them
            total += value
        return {"loss": total / len(y), "accuracy": int(correct.sum().item()) / len(y)}

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
            rho = rho_from_lr(lr, self.c.lr, _lowest_lr(self.c), self.c.rho, self.c.gsam_rho_min)
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


# -- the loop -------------------------------------------------------------------------------
def train(
    config: TrainConfig,
    out: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train as ``config`` says and write the run folder ``out``; return final metrics.

    ``resume=True`` continues the run in ``out`` from its resume point (its saved
    configuration must equal ``config`` but for :data:`LOCATION_FIELDS`); a folder
    with no resume point yet starts the run from the beginning. ``overwrite=True``
    replaces an old run there (only its run files; they are set aside when the new run
    starts, deleted when it completes, and put back if it diverges; see
    :mod:`sharpscope.runfolder`). One process at a time works in ``out`` (a lock).
    Bad options and damaged files raise :class:`SharpscopeError` before anything is
    written; a fresh run
    that diverges (:class:`Diverged`) leaves no files behind and puts a replaced run
    back; any other failure keeps the run, to be resumed.

    In one process, the first SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption) stops
    the run at the end of the current step with a resume point saved, then raises
    KeyboardInterrupt; ``resume=True`` continues it bit for bit (CPU).

    Launched by ``torchrun`` (WORLD_SIZE > 1), or called on every process of an
    initialized process group, this trains data-parallel (see the module docstring):
    every process must call it with the same arguments; rank 0 alone writes ``out``
    and prints; every process returns rank 0's final metrics, after they are written.
    """
    out = os.fspath(out)
    # Checks that need nothing but the options raise alike on every process, before
    # the process group is joined.
    c = resolve_config(config)
    device = distributed.init_from_environment(resolve_device(c.device))
    c.device = str(device)
    c.amp = resolve_amp(c.amp, device)
    main = distributed.is_main_process()
    folder = RunFolder(out, say=_silent if quiet else _print)
    with contextlib.ExitStack() as held:
        # Rank 0 locks the folder, reads the resume point and hands it out: the other
        # processes must not race it. (With --resume, OUT must be on a file system that
        # every node sees.)
        def open_folder() -> dict[str, Any] | None:
            held.enter_context(folder.locked())
            mode = folder.start_mode(resume, overwrite)
            return _read_resume_point(out, c) if mode == "resume" else None

        saved = distributed.on_main(open_folder)
        spec = data_spec(
            c.data, train_subset=c.train_subset, data_dir=c.data_dir, download=c.download
        )
        # A download happens once, on rank 0; the others then read what it fetched.
        load = distributed.main_first if c.download else (lambda fn: fn())
        dataset = load(lambda: load_dataset(spec))
        resolve_config(c, dataset)
        devices = [device.index or 0] if device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=devices),  # the caller's global RNG is restored
            stop_on_signals(distributed.world_size() == 1) as stop,
        ):
            trainer = _Trainer(c, dataset, device)
            try:
                metrics = _run(trainer, folder, saved, overwrite, progress, quiet, stop)
            except Diverged:
                # Worth nothing: a fresh run's files go, and a replaced run comes back.
                if saved is None and main and folder.put_back() and overwrite:
                    print(f"sharpscope train: {out} holds its previous run again", file=sys.stderr)
                raise
            except BaseException:
                # Interrupted, out of memory, disk full...: the run stays, to be resumed;
                # a run it replaces stays set aside until it completes.
                aside = folder.set_aside_path() if main else None
                if aside is not None:
                    print(
                        f"sharpscope train: the run this one replaces is kept in {aside} "
                        "until this one completes",
                        file=sys.stderr,
                    )
                raise
        if main:
            folder.finish()
    # Rank 0's numbers everywhere; and no process returns before the folder is written.
    return distributed.broadcast_object(metrics)


def _read_resume_point(out: str, c: TrainConfig) -> dict[str, Any]:
    """The resume point of the run in ``out``, checked field by field, after checking
    that ``c`` (resolved, on its device) is its configuration but for LOCATION_FIELDS."""
    path = os.path.join(out, "resume.pt")
    saved = read_checkpoint(path)
    if not isinstance(saved.get("resume"), dict) or "config" not in saved:
        raise SharpscopeError(f"{path} is not a sharpscope resume checkpoint")
    _check_resume_state(path, saved["resume"])
    saved_config = resolve_config(config_from_dict(saved["config"], path))
    saved_config.amp = resolve_amp(saved_config.amp, torch.device(c.device))
    differ = [
        f"--{f.name.replace('_', '-')} ({getattr(saved_config, f.name)!r} saved, "
        f"{getattr(c, f.name)!r} now)"
        for f in fields(TrainConfig)
        if f.name not in LOCATION_FIELDS and getattr(c, f.name) != getattr(saved_config, f.name)
    ]
    if differ:
        raise SharpscopeError(
            f"--resume continues the saved run; these options differ from it: {', '.join(differ)}"
        )
    return saved


def _json_records(records: Any) -> bool:
    """A list of metric records: JSON objects with a kind, as metrics.jsonl holds."""
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and isinstance(r.get("kind"), str) for r in records
    ):
        return False
    try:
        json.dumps(records, allow_nan=True)
    except (TypeError, ValueError):
        return False
    return True


# The entries of a resume point's "resume" dict and what each must be.
_RESUME_STATE = {
    "optimizer": lambda v: isinstance(v, dict) and "state" in v and "param_groups" in v,
    "scaler": lambda v: v is None or isinstance(v, dict),
    "step": lambda v: is_whole(v, 0, 2**62),
    "epoch": lambda v: is_whole(v, 0, 2**62),
    "index": lambda v: is_whole(v, 0, 2**62),
    "elapsed": lambda v: is_real(v, finite=True),
    "accumulators": lambda v: (
        isinstance(v, dict)
        and is_real(v.get("loss"), finite=True)
        and all(is_whole(v.get(k), 0, 2**62) for k in ("correct", "seen", "skipped"))
    ),
    "records": _json_records,
    "complete": lambda v: isinstance(v, bool),
}


def _check_resume_state(path: str, state: dict[str, Any]) -> None:
    for key, ok in _RESUME_STATE.items():
        if key not in state or not ok(state[key]):
            raise SharpscopeError(f"{path}: a damaged resume point (its {key} is missing or wrong)")


def _load_resume_state(t: _Trainer, saved: dict[str, Any], path: str) -> None:
    """Put the weights, optimizer and scaler state of a resume point into the trainer,
    after checking that its counters fit this run's plan and its state this model."""
    state, plan = saved["resume"], t.plan
    step, epoch, index = state["step"], state["epoch"], state["index"]
    if (
        step > plan.total_steps
        or index > plan.steps_per_epoch
        or (step != epoch * plan.steps_per_epoch + index)
    ):
        raise SharpscopeError(
            f"{path}: a damaged resume point (step {step}, epoch {epoch}, "
            f"batch {index} do not fit the run)"
        )
    check_weights_fit(t.model.state_dict(), saved["state_dict"], path)
    try:
        t.model.load_state_dict(saved["state_dict"])
        t.optimizer.load_state_dict(state["optimizer"])
        if t.scaler is not None and state.get("scaler"):
            t.scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise SharpscopeError(f"{path}: a damaged resume point ({first_line(exc)})") from None
    for p, entries in t.optimizer.state.items():
        if not isinstance(p, torch.Tensor):  # state of a parameter the run does not have
            raise SharpscopeError(f"{path}: a damaged resume point (optimizer state of {p!r})")
        for value in entries.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise SharpscopeError(
                    f"{path}: a damaged resume point (optimizer state of shape "
                    f"{list(value.shape)} for a parameter of shape {list(p.shape)})"
                )


def _run(
    t: _Trainer,
    folder: RunFolder,
    saved: dict[str, Any] | None,
    overwrite: bool,
    progress: bool,
    quiet: bool,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    c, plan, out = t.c, t.plan, folder.path
    # Under DDP every process runs this loop in step (the collectives: gradients,
    # evaluation, tracking); only rank 0 prints and writes.
    main = distributed.is_main_process()
    say = (lambda msg: None) if quiet or not main else _print
    show_bar = progress and not quiet and main and _isatty()
    records: list[dict[str, Any]] = []
    step = epoch = index = 0
    elapsed = 0.0  # training seconds of earlier sessions of this run
    acc = _EpochTotals(t.device)
    if saved is not None:
        state = saved["resume"]
        if state.get("complete"):
            say(f"{out}: the run is complete (step {state['step']}); nothing to do")
            return dict(saved.get("metrics", {}))
        _load_resume_state(t, saved, os.path.join(out, "resume.pt"))
        step, epoch, index = state["step"], state["epoch"], state["index"]
        elapsed = float(state["elapsed"])
        acc = _EpochTotals(t.device, state["accumulators"])
        records = list(state["records"])
        say(f"resuming {out} at step {step} (epoch {epoch + 1}, batch {index})")
        threads = state.get("threads")
        if t.device.type == "cpu" and threads not in (None, torch.get_num_threads()):
            # CPU reductions split work by thread: the last bits can differ.
            say(
                f"note: the run used {threads} CPU threads, this process {torch.get_num_threads()}"
                "; the result matches an uninterrupted run only up to rounding"
            )
        world = state.get("world_size", 1)
        if world != t.world:
            say(
                f"note: the run used {world} processes, this one {t.world}; the result "
                "matches an uninterrupted run only up to rounding (and BatchNorm batch "
                "statistics and dropout masks differ)"
            )
    elif main:
        # Only now, with the new run set up and about to write its own files: an old
        # run is set aside (--overwrite), a killed start's leftovers go.
        folder.begin_fresh(overwrite)
        write_json(os.path.join(out, "config.json"), asdict(c))

    tracked = None
    if c.track_every is not None:
        tracked = t.dataset.examples("train", c.track_samples, seed=c.seed)
    header = {"model": t.spec, "data": t.dataset.spec, "config": asdict(c)}
    session_start = last_resume = last_metrics = time.monotonic()

    def write_metrics() -> None:
        nonlocal last_metrics
        if not main:
            return
        write_jsonl(os.path.join(out, "metrics.jsonl"), records)
        last_metrics = time.monotonic()

    def write_resume(metrics: dict[str, Any] | None = None) -> None:
        nonlocal last_resume
        if not main:  # what it saves is the same on every process (rank 0's buffers)
            return
        state = {
            "optimizer": _to_cpu(t.optimizer.state_dict()),
            "scaler": t.scaler.state_dict() if t.scaler is not None else None,
            "step": step,
            "epoch": epoch,
            "index": index,
            "elapsed": elapsed + time.monotonic() - session_start,
            "accumulators": acc.to_dict(),
            "records": list(records),
            "complete": metrics is not None,
            "threads": torch.get_num_threads(),
            "world_size": t.world,
        }
        # metrics.jsonl first: the resume state carries the records, so a kill between
        # the two writes loses nothing.
        write_metrics()
        payload = {**header, "metrics": metrics or {}, "state_dict": _cpu_state_dict(t.model)}
        save_checkpoint(os.path.join(out, "resume.pt"), {**payload, "resume": state})
        last_resume = time.monotonic()

    def save_trajectory() -> None:
        if not main:
            return
        os.makedirs(os.path.join(out, TRAJECTORY), exist_ok=True)
        payload = {**header, "metrics": {"step": step, "epoch": epoch}}
        path = os.path.join(out, TRAJECTORY, f"step_{step:07d}.pt")
        save_checkpoint(path, {**payload, "state_dict": _cpu_state_dict(t.model)})

    def track() -> None:
        record = t.track(step, tracked)
        records.append(record)
        line = f"step {step}: hessian top eigenvalue {record['hessian_top']:.4g}"
        if "sharpness" in record:
            line += f", sharpness {record['sharpness']:.4g}"
        say(line)

    if saved is None:
        if c.save_every is not None:
            save_trajectory()
        if tracked is not None:
            track()
        write_resume()  # a resume point before the first step

    epoch_start = time.monotonic()
    bar = None
    while step < plan.total_steps:
        steps_this_epoch = min(
            plan.steps_per_epoch, plan.total_steps - epoch * plan.steps_per_epoch
        )
        if bar is None and show_bar:
            from tqdm import tqdm

            bar = tqdm(
                total=steps_this_epoch,
                initial=index,
                desc=f"epoch {epoch + 1}/{plan.epochs}",
                leave=False,
                file=sys.stderr,
            )
        x, y = t.batch(epoch, index, step)
        lr = t.set_lr(step)
        loss_sum, correct, skipped = t.step(x, y, step)
        # Totals of the global batch (summed over the processes in t.step); no host
        # sync: they stay on the device.
        acc.add(loss_sum, correct, plan.batch_size, skipped)
        step, index = step + 1, index + 1
        if bar is not None:
            bar.update(1)
        if tracked is not None and step % c.track_every == 0:
            track()
        if c.save_every is not None and (step % c.save_every == 0 or step == plan.total_steps):
            save_trajectory()
        epoch_done = index >= steps_this_epoch
        if epoch_done:
            if bar is not None:
                bar.close()
                bar = None
            record = _epoch_record(t, epoch, step, lr, acc, time.monotonic() - epoch_start)
            records.append(record)
            say(_summary(record, plan.epochs))
            if c.amp != "fp16" and not math.isfinite(record["train_loss"]):
                write_metrics()
                raise Diverged(
                    f"training diverged: the loss is {record['train_loss']} in epoch "
                    f"{epoch + 1}; try a smaller --lr"
                )
            epoch, index, acc = epoch + 1, 0, _EpochTotals(t.device)
            epoch_start = time.monotonic()
        if step < plan.total_steps:
            now = time.monotonic()
            if c.checkpoint_every is not None:
                if step % c.checkpoint_every == 0:
                    write_resume()
            elif epoch_done and now - last_resume >= RESUME_MIN_INTERVAL_S:
                write_resume()
            if epoch_done and now - last_metrics >= METRICS_MIN_INTERVAL_S:
                write_metrics()
            if stop is not None and stop.signal is not None:
                if bar is not None:
                    bar.close()
                write_resume()
                name = signal.Signals(stop.signal).name
                print(
                    f"sharpscope train: {name}: stopped after step {step}; "
                    f"continue with --resume --out {out}",
                    file=sys.stderr,
                )
                raise KeyboardInterrupt
    if bar is not None:
        bar.close()

    final: dict[str, Any] = {"kind": "final", "step": step, "epochs": step / plan.steps_per_epoch}
    epochs_logged = [r for r in records if r["kind"] == "epoch"]
    if acc.seen:  # a partial last epoch (step mode)
        totals = acc.to_dict()
        final["train_loss"] = totals["loss"] / acc.seen
        final["train_accuracy"] = totals["correct"] / acc.seen
    elif epochs_logged:
        final["train_loss"] = epochs_logged[-1]["train_loss"]
        final["train_accuracy"] = epochs_logged[-1]["train_accuracy"]
    train_eval, test_eval = t.evaluate("train"), t.evaluate("test")
    final["train_eval_loss"] = train_eval["loss"]  # whole training set, eval mode
    final["train_eval_accuracy"] = train_eval["accuracy"]
    final["test_loss"] = test_eval["loss"]
    final["test_accuracy"] = test_eval["accuracy"]
    final["seconds"] = elapsed + time.monotonic() - session_start
    final["world_size"] = t.world
    records.append(final)
    metrics = {k: v for k, v in final.items() if k != "kind"}
    if main:
        payload = {**header, "metrics": metrics, "state_dict": _cpu_state_dict(t.model)}
        save_checkpoint(os.path.join(out, "checkpoint.pt"), payload)
    write_resume(metrics)
    say(
        f"done: {step} steps in {final['seconds']:.1f}s, test accuracy "
        f"{100 * final['test_accuracy']:.2f}%, test loss {final['test_loss']:.4f}; wrote {out}"
    )
    return metrics


class _EpochTotals:
    """Sums over the steps of an epoch so far, kept on the device (one host sync per
    epoch, not per step): clean-pass loss times batch size, correct count, skipped steps."""

    def __init__(self, device: torch.device, saved: dict[str, Any] | None = None):
        saved = saved or {"loss": 0.0, "correct": 0, "seen": 0, "skipped": 0}
        self.loss = torch.tensor(saved["loss"], dtype=torch.float64, device=device)
        self.correct = torch.tensor(saved["correct"], dtype=torch.int64, device=device)
        self.skipped = torch.tensor(saved["skipped"], dtype=torch.int64, device=device)
        self.seen = int(saved["seen"])

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor, n: int, skipped) -> None:
        self.loss += loss_sum.double()
        self.correct += correct
        self.skipped += skipped
        self.seen += n

    def to_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss.item(),
            "correct": int(self.correct.item()),
            "seen": self.seen,
            "skipped": int(self.skipped.item()),
        }


def _epoch_record(
    t: _Trainer, epoch: int, step: int, lr: float, acc: _EpochTotals, seconds: float
) -> dict[str, Any]:
    totals = acc.to_dict()
    record: dict[str, Any] = {
        "kind": "epoch",
        "epoch": epoch + 1,
        "step": step,
        "train_loss": totals["loss"] / max(totals["seen"], 1),
        "train_accuracy": totals["correct"] / max(totals["seen"], 1),
        "lr": lr,
    }
    if (epoch + 1) % t.c.eval_every == 0:
        test = t.evaluate("test")
        record["test_loss"], record["test_accuracy"] = test["loss"], test["accuracy"]
    if isinstance(t.optimizer, GSAM):
        record["rho"] = t.optimizer.param_groups[0]["rho"]
    if t.scaler is not None:
        record["skipped_steps"] = totals["skipped"]
        record["loss_scale"] = t.scaler.get_scale()
    record["seconds"] = seconds
    return record


def _summary(r: dict[str, Any], epochs: int) -> str:
    line = (
        f"epoch {r['epoch']}/{epochs}  step {r['step']}  "
        f"train loss {r['train_loss']:.4f} acc {100 * r['train_accuracy']:.2f}%"
    )
    if "test_loss" in r:
        line += f"  test loss {r['test_loss']:.4f} acc {100 * r['test_accuracy']:.2f}%"
    return line + f"  lr {r['lr']:.4g}  {r['seconds']:.1f}s"


def _isatty() -> bool:
    return sys.stderr.isatty()


def _silent(msg: str) -> None:
    pass


def _print(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stdout)  # above a progress bar, if one is shown
    sys.stdout.flush()


__all__ = [
    "TrainConfig",
    "config_from_dict",
    "derive_seed",
    "learning_rate",
    "load_run_config",
    "NoResumePoint",
    "resolve_config",
    "train",
]
