"""Data-set registry: every data set is a set of in-memory tensors.

Everything sharpscope trains on fits in memory (the largest, CIFAR, is 600 MB as
float32), so a data set is four tensors plus a name for its augmentation; batches
are index slices, which keeps data on the device and makes shuffling reproducible
from (seed, epoch) alone (what bit-identical resume needs).

Data sets: ``digits`` (scikit-learn, 8x8), ``mnist1d`` (Greydanus 2020, generated
offline), ``cifar10`` / ``cifar100`` (the python-pickle release, read with a
restricted unpickler) and ``synthetic`` (a seeded Gaussian mixture); and the user's
own (:mod:`sharpscope.userdata`): ``.npz`` and ``.pt`` files, image folders and
``module:factory`` / ``file.py:factory``, held in memory as tensors too.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .checks import is_real, is_whole
from .errors import SharpscopeError, SharpscopeWarning

DATASETS = ("digits", "mnist1d", "cifar10", "cifar100", "synthetic")

# Per-channel means and standard deviations of the CIFAR training sets, the values
# used throughout the CIFAR literature (e.g. the SAM and ASAM reference code).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# The official archives (Krizhevsky 2009) and their MD5 sums.
CIFAR_ARCHIVES = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
    ),
}


@dataclass
class Dataset:
    """A data set held as tensors.

    ``train_x`` has shape (n_train, *input_shape), ``train_y`` (n_train,) int64 class
    indices (``task`` "classification") or float32 targets of shape (n_train,) or
    (n_train, k) ("regression"; ``num_classes`` is then the number of outputs, 1 or k);
    likewise for test. ``augment`` names the training-time augmentation (None or
    "crop_flip"). ``spec`` rebuilds it with :func:`load_dataset`.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    augment: str | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    task: str = "classification"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (inputs, targets) of split ``name`` ("train" or "test")."""
        if name == "train":
            return self.train_x, self.train_y
        if name == "test":
            return self.test_x, self.test_y
        raise SharpscopeError(f"unknown split {name!r}: choose train or test")

    def examples(
        self, split: str = "train", n: int | None = None, seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed set of ``n`` examples of ``split`` (all when ``n`` is None or larger).

        The subset is the first ``n`` of a permutation drawn from ``seed``, so the
        same (split, n, seed) always gives the same examples: measurements and
        landscapes of different checkpoints are taken on identical data.
        """
        x, y = self.split(split)
        if n is not None and n <= 0:
            raise SharpscopeError(f"number of examples must be positive, got {n}")
        if n is None or n >= len(y):
            return x, y
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
        idx = idx.sort().values.to(y.device)
        return x[idx], y[idx]

    def example_subsets(
        self, split: str, n: int, k: int, seed: int = 0
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``k`` disjoint sets of ``n`` examples of ``split``: consecutive blocks of the
        permutation :meth:`examples` draws from ``seed`` (the first block is its set)."""
        x, y = self.split(split)
        if n * k > len(y):
            raise SharpscopeError(
                f"{k} disjoint sets of {n} examples need {n * k}, the {split} split has "
                f"{len(y)}: lower samples or subsets"
            )
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        blocks = [perm[i * n : (i + 1) * n].sort().values.to(y.device) for i in range(k)]
        return [(x[idx], y[idx]) for idx in blocks]

    def to(self, device: torch.device | str) -> Dataset:
        """The same data set with its tensors on ``device``."""
        return Dataset(
            self.name,
            self.train_x.to(device),
            self.train_y.to(device),
            self.test_x.to(device),
            self.test_y.to(device),
            self.num_classes,
            self.augment,
            dict(self.spec),
            self.task,
        )


def data_spec(
    name: str = "digits",
    *,
    train_subset: int | None = None,
    data_dir: str | None = None,
    download: bool = False,
    synthetic: dict[str, int] | None = None,
    label_noise: float = 0.0,
) -> dict[str, Any]:
    """The plain-dict description of a data set, as stored in checkpoints: a registry
    name, or the user's own data (a file, folder or factory: ``"source"`` says which;
    :func:`load_dataset` adds what identifies it). ``label_noise``: the fraction of
    training labels replaced (see :func:`noisy_labels`); recorded only when not 0."""
    if not isinstance(name, str) or not name.strip():
        raise SharpscopeError(f"--data must name a data set, got {name!r}")
    noise = {"label_noise": float(label_noise)} if label_noise else {}
    if name not in DATASETS:
        from .userdata import source_of

        return {"name": name, "source": source_of(name), "train_subset": train_subset, **noise}
    spec: dict[str, Any] = {"name": name, "train_subset": train_subset, **noise}
    if name in CIFAR_ARCHIVES:
        spec["data_dir"] = data_dir
        spec["download"] = download
    if name == "synthetic":
        spec["synthetic"] = dict(SYNTHETIC_DEFAULTS, **(synthetic or {}))
    return spec


# The keys of a data spec that say where the data lies and whether it may be fetched:
# the user's machine's business, never taken from a file, not part of what the data is.
LOCATION_KEYS = ("data_dir", "download")


def without_location(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """``spec`` without its LOCATION_KEYS: what the data set is, wherever it lies."""
    return None if spec is None else {k: v for k, v in spec.items() if k not in LOCATION_KEYS}


def data_spec_from_file(
    spec: Any,
    source: str,
    *,
    data_dir: str | None = None,
    download: bool = False,
    trust_code: bool = False,
) -> dict[str, Any]:
    """A data spec read from a file (checkpoint, resume point), made safe to load.

    Only registry data sets, with fields of the right types; the folder and the
    download flag the file records are dropped for the caller's ``data_dir`` and
    ``download``: a file never makes sharpscope create folders or download. The user's
    own data (a file, folder or factory a checkpoint names) is refused unless
    ``trust_code`` (the caller names data instead: see :func:`check_trusted_data`).
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise SharpscopeError(f"{source}: its data entry is not a data-set description")
    name = spec.get("name")
    if "source" in spec:  # the user's own data
        return _user_spec_from_file(spec, source, trust_code)
    if not isinstance(name, str) or name not in DATASETS:
        raise SharpscopeError(
            f"{source}: unknown data set {name!r} (sharpscope reads {', '.join(DATASETS)})"
        )
    subset = spec.get("train_subset")
    if subset is not None and not is_whole(subset, 1):
        raise SharpscopeError(f"{source}: bad train_subset {subset!r} in its data entry")
    synthetic = spec.get("synthetic") if name == "synthetic" else None
    if synthetic is not None:
        if not isinstance(synthetic, dict) or set(synthetic) - set(SYNTHETIC_DEFAULTS):
            raise SharpscopeError(f"{source}: bad synthetic data settings {synthetic!r}")
        for key, value in synthetic.items():
            if not is_whole(value, 0 if key == "seed" else 1):
                raise SharpscopeError(f"{source}: bad synthetic {key} {value!r}")
    return data_spec(
        name,
        train_subset=subset,
        data_dir=data_dir,
        download=download,
        synthetic=synthetic,
        label_noise=_noise_from_file(spec, source),
    )


def _noise_from_file(spec: dict[str, Any], source: str) -> float:
    noise = spec.get("label_noise", 0.0)
    if not check_label_noise(noise, raise_error=False):
        raise SharpscopeError(f"{source}: bad label_noise {noise!r} in its data entry")
    return float(noise)


def check_label_noise(noise: Any, raise_error: bool = True) -> bool:
    """Whether ``noise`` is a fraction of labels to replace, in [0, 1)."""
    ok = is_real(noise) and 0 <= noise < 1
    if not ok and raise_error:
        raise SharpscopeError(f"label noise must be a fraction in [0, 1), got {noise!r}")
    return ok


def _user_spec_from_file(spec: dict[str, Any], source: str, trust_code: bool) -> dict[str, Any]:
    from .userdata import source_of

    name = spec.get("name")
    if not isinstance(name, str) or not name or name in DATASETS:
        raise SharpscopeError(f"{source}: a damaged data entry (name {name!r})")
    if spec.get("source") != source_of(name):
        raise SharpscopeError(f"{source}: a damaged data entry (source {spec.get('source')!r})")
    check_trusted_data(name, source, trust_code=trust_code)
    subset = spec.get("train_subset")
    if subset is not None and not is_whole(subset, 1):
        raise SharpscopeError(f"{source}: bad train_subset {subset!r} in its data entry")
    return data_spec(name, train_subset=subset, label_noise=_noise_from_file(spec, source))


def check_trusted_data(name: str, source: str, *, trust_code: bool = False) -> None:
    """Refuse the user's own data (a file, folder or factory) that a file names: it is
    opened, or its code run, only when the user names data themselves (``--data``,
    ``data=``), which then replaces the file's, or with ``trust_code``."""
    if name in DATASETS or trust_code:
        return
    from .userdata import source_of

    kind = source_of(name)
    if kind == "factory":
        raise SharpscopeError(
            f"{source} names the data factory {name!r}, which is code: sharpscope runs code "
            f"named in a file only when you name it too (--data {name}, or data= / "
            "trust_code=True in Python)"
        )
    what = "folder" if kind == "folder" else "file"
    raise SharpscopeError(
        f"{source} names the data {what} {name!r}: sharpscope opens data a file names only "
        f"when you name it too (--data {name}, or data= / trust_code=True in Python)"
    )


# The keys of a data spec that identify the user's own data: a file's SHA-256, or that of
# the tensors of a folder or a factory's data set.
IDENTITY_KEYS = ("sha256", "tensors_sha256")


def data_difference(recorded: Any, loaded: dict[str, Any]) -> str | None:
    """How the data set ``loaded`` (a loaded spec) differs from the one a file records, in
    words, or None when nothing tells them apart (same identity, or none to compare)."""
    if not isinstance(recorded, dict):
        return None
    for key in IDENTITY_KEYS:
        was, now = recorded.get(key), loaded.get(key)
        if _is_digest(was) and _is_digest(now) and was != now:
            what = "file" if key == "sha256" else "data"
            return (
                f"{loaded.get('name')} is not the {what} it was trained on ({key} "
                f"{was[:12]}… recorded for {recorded.get('name')!r}, {now[:12]}… now)"
            )
    return None


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def warn_if_other_data(recorded: Any, loaded: dict[str, Any], source: str) -> None:
    """A :class:`SharpscopeWarning` when the data the user named is not the data set
    ``source`` records (measured anyway: the user named it)."""
    difference = data_difference(recorded, loaded)
    if difference is not None:
        warnings.warn(f"{source}: {difference}; using the data you named", SharpscopeWarning, 2)


def check_loss_fits(dataset: Dataset, loss: str, source: str | None = None) -> None:
    """Refuse a loss that cannot take the data set's targets: regression targets need
    ``mse``."""
    if dataset.task == "regression" and loss != "mse":
        where = f"{source}: " if source else ""
        raise SharpscopeError(
            f"{where}{dataset.name} has real-valued targets (a regression data set): it needs "
            f"--loss mse, not {loss} (store class labels as integers for classification)"
        )


def load_dataset(spec: dict[str, Any] | str) -> Dataset:
    """Build the data set described by ``spec`` (a name or a :func:`data_spec` dict): a
    registry data set, or the user's own (:mod:`sharpscope.userdata`)."""
    if isinstance(spec, str):
        spec = data_spec(spec)
    name = spec.get("name")
    if name not in DATASETS:
        from .userdata import load_user_data

        ds = load_user_data(spec)
        subset = spec.get("train_subset")
        ds = ds if subset is None else _train_subset(ds, int(subset))
        return noisy_labels(ds, spec.get("label_noise", 0.0))
    if name == "digits":
        ds = _digits()
    elif name == "mnist1d":
        ds = _mnist1d()
    elif name == "synthetic":
        ds = _synthetic(**dict(SYNTHETIC_DEFAULTS, **(spec.get("synthetic") or {})))
    else:
        ds = _cifar(name, spec.get("data_dir"), bool(spec.get("download")))
    ds.spec = dict(spec)
    subset = spec.get("train_subset")
    if subset is not None:
        ds = _train_subset(ds, int(subset))
    return noisy_labels(ds, spec.get("label_noise", 0.0))


# Label noise is part of the data, not of a run: one fixed draw (this seed) for every
# training seed, so runs of several seeds and both optimizers see the same noisy labels.
# Drawn by numpy from a seed sequence of its own: a torch permutation from a small seed
# would be the very permutation Dataset.examples draws from seed 0, making its first
# examples exactly the noisy ones.
LABEL_NOISE_SEED = (0, 0x6C6162656C)  # (0, "label" in hex)


def noisy_labels(ds: Dataset, fraction: float) -> Dataset:
    """``ds`` with round(``fraction`` x n) of its training labels replaced by another
    class drawn uniformly (symmetric label noise, the setting of Foret et al. 2021,
    Sec. 3.3 / Table 4, after Zhang et al. 2017); test labels stay clean. Which examples
    and which wrong classes come from LABEL_NOISE_SEED alone."""
    if not fraction:
        return ds
    check_label_noise(fraction)
    y = ds.train_y
    if y.is_floating_point() or ds.num_classes < 2:
        raise SharpscopeError("label noise needs class labels (a classification data set)")
    rng = np.random.default_rng(LABEL_NOISE_SEED)
    chosen = torch.from_numpy(rng.permutation(len(y))[: round(fraction * len(y))])
    shift = torch.from_numpy(rng.integers(1, ds.num_classes, len(chosen)))  # never 0: wrong
    noisy = y.clone()
    noisy[chosen] = (y[chosen] + shift.to(y)) % ds.num_classes
    ds.train_y = noisy
    return ds


def _train_subset(ds: Dataset, n: int) -> Dataset:
    if n <= 0:
        raise SharpscopeError(f"--train-subset must be positive, got {n}")
    if n > len(ds.train_y):
        raise SharpscopeError(f"--train-subset {n} exceeds the {len(ds.train_y)} training examples")
    # A fixed permutation (seed 0), independent of the training seed, so two runs
    # with different seeds see the same examples.
    idx = torch.randperm(len(ds.train_y), generator=torch.Generator().manual_seed(0))[:n]
    idx = idx.sort().values
    ds.train_x, ds.train_y = ds.train_x[idx], ds.train_y[idx]
    return ds


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    # A fixed 75/25 split (seed 0): 1347 train, 450 test.
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = 450
    test, train = perm[:n_test].sort().values, perm[n_test:].sort().values
    return Dataset("digits", x[train], y[train], x[test], y[test], 10)


def _mnist1d() -> Dataset:
    """MNIST-1D with the package's default arguments: 4000 train / 1000 test, length 40.

    Generated in memory (``make_dataset`` is deterministic given its seed, 42 by
    default); nothing is downloaded or written.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    return Dataset(
        "mnist1d",
        torch.tensor(d["x"], dtype=torch.float32).unsqueeze(1),
        torch.tensor(d["y"], dtype=torch.int64),
        torch.tensor(d["x_test"], dtype=torch.float32).unsqueeze(1),
        torch.tensor(d["y_test"], dtype=torch.int64),
        10,
    )


SYNTHETIC_DEFAULTS = {"n_train": 1024, "n_test": 512, "dim": 16, "classes": 4, "seed": 0}


# At most this many numbers in a synthetic data set (1 GiB of float32).
MAX_SYNTHETIC_ELEMENTS = 2**28


def _synthetic(n_train: int, n_test: int, dim: int, classes: int, seed: int) -> Dataset:
    """A Gaussian mixture: one unit-variance blob per class around random centres."""
    if min(n_train, n_test, dim, classes) <= 0:
        raise SharpscopeError("synthetic data needs positive n_train, n_test, dim and classes")
    if (n_train + n_test + classes) * dim > MAX_SYNTHETIC_ELEMENTS:
        raise SharpscopeError(
            f"synthetic data of {n_train} + {n_test} examples of dimension {dim} is too large "
            f"(at most {MAX_SYNTHETIC_ELEMENTS} numbers)"
        )
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, dim, generator=g)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(classes, (n,), generator=g)
        return centres[y] + torch.randn(n, dim, generator=g), y

    (xtr, ytr), (xte, yte) = draw(n_train), draw(n_test)
    return Dataset("synthetic", xtr, ytr, xte, yte, classes)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR batch files contain: dicts, lists, bytes, arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _read_cifar_batch(path: str) -> dict:
    with open(path, "rb") as f:
        try:
            raw = _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
        except Exception as exc:  # any corruption: a clear message, not a traceback
            raise SharpscopeError(f"{path}: not a CIFAR batch file ({exc})") from None
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def _cifar(name: str, data_dir: str | None, download: bool) -> Dataset:
    url, md5, folder = CIFAR_ARCHIVES[name]
    if not data_dir:
        raise SharpscopeError(f"{name} needs --data-dir (the folder that holds {folder}/)")
    root = os.path.join(data_dir, folder)
    if not os.path.isdir(root):
        if not download:
            raise SharpscopeError(
                f"{root} not found: pass --download to fetch {name}, or point --data-dir at it"
            )
        _download_and_extract(url, md5, data_dir)
    if name == "cifar10":
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key, classes = ["test_batch"], "labels", 10
    else:
        train_files, test_files, label_key, classes = ["train"], ["test"], "fine_labels", 100

    def read(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for fname in files:
            path = os.path.join(root, fname)
            if not os.path.isfile(path):
                raise SharpscopeError(f"{path} missing: the {name} folder is incomplete")
            batch = _read_cifar_batch(path)
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[label_key], dtype=np.int64))
        x = torch.from_numpy(np.concatenate(xs)).float().div_(255.0)
        mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in CIFAR_STATS[name])
        return (x - mean) / std, torch.from_numpy(np.concatenate(ys))

    (xtr, ytr), (xte, yte) = read(train_files), read(test_files)
    return Dataset(name, xtr, ytr, xte, yte, classes, augment="crop_flip")


def _download_and_extract(url: str, md5: str, data_dir: str) -> None:
    os.makedirs(data_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=data_dir, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            shutil.copyfileobj(resp, out)
        digest = hashlib.md5(open(tmp, "rb").read()).hexdigest()
        if digest != md5:
            raise SharpscopeError(f"download of {url} is corrupt (md5 {digest}, expected {md5})")
        with tarfile.open(tmp) as tar:
            tar.extractall(data_dir, filter="data")
    except OSError as exc:
        raise SharpscopeError(f"could not download {url}: {exc}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def augment_batch(x: torch.Tensor, kind: str | None, generator: torch.Generator) -> torch.Tensor:
    """Apply training augmentation ``kind`` to a batch (n, C, H, W).

    "crop_flip": zero-pad 4 pixels, take a random HxW crop, flip left-right with
    probability 1/2 (the standard CIFAR augmentation, He et al. 2016, Sec. 4.2).
    Random numbers come from the CPU ``generator`` so runs reproduce on any device.
    """
    if kind is None:
        return x
    if kind != "crop_flip":
        raise ValueError(f"unknown augmentation {kind!r}")
    n, c, h, w = x.shape
    pad = 4
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(-1), cols)[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]
