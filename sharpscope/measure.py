"""One model, every number: loss, accuracy, sharpness and Hessian spectrum.

:func:`measure` returns the JSON document behind ``sharpscope measure``: every value
sits next to the settings that produced it (docs/design.md, "Contracts"). The work is split so
that a command measuring several checkpoints can refuse bad input before the long part:
:func:`check_measure_settings` (no model needed), :func:`load_model_and_data` (one
checkpoint), :func:`check_model` (one model: parameter count, finite loss), then
:func:`measure`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .checkpoint import checkpoint_loss, load_model_and_data
from .data import Dataset
from .errors import SharpscopeError
from .files import json_safe
from .hessian import METHODS, hessian_density, hessian_eigenvalues, hessian_trace
from .losses import get_loss
from .objective import PARAM_FILTERS, Objective, model_fits_data
from .sharpness import NORMS, average_sharpness, sharpness

# Defaults, each with its source.
DEFAULT_SAMPLES = 1024  # 1024 fixed examples (or all if fewer): stable top eigenvalues
DEFAULT_BATCH_SIZE = 512  # forward-pass size; no effect on the numbers (objective.py)
DEFAULT_RHOS = (0.05,)  # SAM's default radius (Foret et al. 2021)
DEFAULT_STEPS = 20  # APGD steps (Andriushchenko et al. 2023, Sec. 3)
DEFAULT_AVERAGE_SAMPLES = 100  # Monte Carlo draws (Andriushchenko et al. 2023's code)
DEFAULT_TRACE_SAMPLES = 100  # PyHessian's trace budget (maxIter=100)
DEFAULT_EIG_TOL = 1e-4  # relative residual of eigenpairs (benchmarks/bench_hessian.py)


def _with_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure`'s keywords, with its defaults for those not in ``settings``
    (a TypeError, as for any call, for a keyword it does not take)."""
    bound = inspect.signature(measure).bind(None, None, **settings)
    bound.apply_defaults()
    return bound.arguments


def check_measure_settings(**settings: Any) -> None:
    """Raise :class:`SharpscopeError` for a bad setting of :func:`measure` (no model needed).

    ``settings`` are :func:`measure`'s keywords; those left out take its defaults.
    """
    s = _with_defaults(settings)
    if s["split"] not in ("train", "test"):
        raise SharpscopeError(f"unknown split {s['split']!r}: choose train or test")
    if s["samples"] is not None and s["samples"] <= 0:
        raise SharpscopeError(f"samples must be a positive number of examples, got {s['samples']}")
    if s["batch_size"] <= 0:
        raise SharpscopeError(f"batch size must be positive, got {s['batch_size']}")
    for rho in s["rhos"]:
        if not (rho > 0 and math.isfinite(rho)):
            raise SharpscopeError(f"rho must be positive, got {rho}")
    if s["norm"] not in NORMS:
        raise SharpscopeError(f"unknown norm {s['norm']!r}: choose l2 or linf")
    if not s["eta"] >= 0:
        raise SharpscopeError(f"eta must be >= 0, got {s['eta']}")
    if s["m"] is not None and s["m"] < 1:
        raise SharpscopeError(f"m must be a positive number of examples, got {s['m']}")
    if s["steps"] < 1 or s["restarts"] < 1:
        raise SharpscopeError(
            f"steps and restarts must be at least 1, got {s['steps']} and {s['restarts']}"
        )
    if s["average"] and s["average_samples"] < 2:
        raise SharpscopeError(
            f"average sharpness needs at least 2 samples, got {s['average_samples']}"
        )
    if s["eigs"] < 0:
        raise SharpscopeError(f"eigs must be >= 0, got {s['eigs']}")
    if s["smallest"] and s["eigs"] == 0:
        raise SharpscopeError("smallest eigenvalues asked for with eigs 0: give eigs >= 1")
    if s["eig_method"] not in METHODS:
        raise SharpscopeError(
            f"unknown eigenvalue method {s['eig_method']!r}: choose {', '.join(METHODS)}"
        )
    if s["smallest"] and s["eig_method"] == "pyhessian":
        raise SharpscopeError("PyHessian computes the largest eigenvalues only: use lanczos")
    if not s["eig_tol"] > 0:
        raise SharpscopeError(f"eigenvalue tolerance must be positive, got {s['eig_tol']}")
    if s["trace"] and s["trace_samples"] < 2:
        raise SharpscopeError(f"the trace needs at least 2 probes, got {s['trace_samples']}")
    if s["param_filter"] not in PARAM_FILTERS:
        raise SharpscopeError(
            f"unknown parameter filter {s['param_filter']!r}: choose {', '.join(PARAM_FILTERS)}"
        )
    get_loss(s["loss"])  # raises for an unknown loss name


def _objectives(
    model: nn.Module,
    dataset: Dataset,
    *,
    loss: str,
    samples: int | None,
    seed: int,
    batch_size: int,
    param_filter: str,
    device: torch.device | str | None,
) -> dict[str, Objective]:
    """One objective per split on the same seeded ``samples`` examples (data.py)."""
    loss_fn = get_loss(loss)
    dtype = next(model.parameters()).dtype
    objectives = {}
    for name in ("train", "test"):
        x, y = dataset.examples(name, samples, seed=seed)
        if x.is_floating_point():
            x = x.to(dtype)  # a float64 model is measured in float64
        objectives[name] = Objective(
            model,
            (x, y),
            loss_fn,
            param_filter=param_filter,
            batch_size=batch_size,
            device=device,
            accumulate_dtype=torch.float64,  # docs/algorithms.md, pitfalls: small-rho differences
        )
    return objectives


def _check_objective(obj: Objective, split: str, eigs: int) -> dict[str, float]:
    if eigs > obj.numel:
        raise SharpscopeError(f"eigs {eigs} exceeds the model's {obj.numel} parameters")
    with model_fits_data():
        evaluation = obj.evaluate()
    if not math.isfinite(evaluation["loss"]):
        raise SharpscopeError(f"the {split} loss is {evaluation['loss']}: nothing to measure")
    return evaluation


def check_model(model: nn.Module, dataset: Dataset, **settings: Any) -> None:
    """Raise :class:`SharpscopeError` if :func:`measure` would refuse this model with
    these ``settings`` (its keywords): more eigenvalues asked for than it has parameters,
    or a non-finite loss. Costs one forward pass over ``samples`` examples."""
    s = _with_defaults(settings)
    objectives = _objectives(
        model,
        dataset,
        loss=s["loss"],
        samples=s["samples"],
        seed=s["seed"],
        batch_size=s["batch_size"],
        param_filter=s["param_filter"],
        device=s["device"],
    )
    _check_objective(objectives[s["split"]], s["split"], s["eigs"])


def measure(
    model: nn.Module,
    dataset: Dataset,
    *,
    loss: str = "ce",
    split: str = "train",
    samples: int | None = DEFAULT_SAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    rhos: Sequence[float] = DEFAULT_RHOS,
    norm: str = "l2",
    adaptive: bool = False,
    eta: float = 0.0,
    m: int | None = None,
    steps: int = DEFAULT_STEPS,
    restarts: int = 1,
    average: bool = False,
    average_samples: int = DEFAULT_AVERAGE_SAMPLES,
    eigs: int = 1,
    smallest: bool = False,
    eig_method: str = "lanczos",
    eig_tol: float = DEFAULT_EIG_TOL,
    trace: bool = True,
    trace_samples: int = DEFAULT_TRACE_SAMPLES,
    density: bool = False,
    param_filter: str = "all",
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Measure ``model`` on ``dataset``; return the results document (plain JSON values).

    Loss and accuracy are reported on both splits ({"train": ..., "test": ...}, each on
    ``samples`` examples drawn with ``seed``, all if fewer); worst-case sharpness (one
    entry per rho, :func:`~sharpscope.sharpness.sharpness`), the optional average-case
    sharpness, and the Hessian numbers (``hessian.eigenvalues`` largest first with
    ``hessian.eigenvalue_settings``, optional ``hessian.smallest_eigenvalues``,
    ``hessian.trace``, optional ``hessian.density``) on ``split``. Every analyzer
    sees the same examples, in eval mode, summed in float64. The model is not modified
    (not even moved: ``device`` is where the computation runs, default the model's).
    Non-finite numbers (padding in the density's node table) become None.
    """
    settings = {k: v for k, v in locals().items() if k not in ("model", "dataset")}
    check_measure_settings(**settings)
    dtype = next(model.parameters()).dtype
    objectives = _objectives(
        model,
        dataset,
        loss=loss,
        samples=samples,
        seed=seed,
        batch_size=batch_size,
        param_filter=param_filter,
        device=device,
    )
    obj = objectives[split]
    evaluations = {split: _check_objective(obj, split, eigs)}
    other = "test" if split == "train" else "train"
    evaluations[other] = objectives[other].evaluate()
    doc: dict[str, Any] = {
        "split": split,
        "n_examples": obj.n_examples,
        "n_examples_by_split": {k: o.n_examples for k, o in objectives.items()},
        "n_params": obj.numel,
        "param_filter": param_filter,
        "loss_function": loss,
        "dtype": str(dtype).replace("torch.", ""),
        "accumulate_dtype": "float64",
        "device": str(obj.device),
        "seed": seed,
        "loss": {k: evaluations[k]["loss"] for k in ("train", "test")},
        "accuracy": {k: evaluations[k]["accuracy"] for k in ("train", "test")},
        "sharpness": [],
    }
    for rho in rhos:
        result = sharpness(
            obj,
            rho=rho,
            norm=norm,
            adaptive=adaptive,
            eta=eta,
            steps=steps,
            restarts=restarts,
            m=m,
            seed=seed,
            progress=progress,
        )
        doc["sharpness"].append({"split": split, **result.to_dict()})
    if average:
        doc["average_sharpness"] = [
            {
                "split": split,
                **average_sharpness(
                    obj,
                    rho=rho,
                    norm=norm,
                    adaptive=adaptive,
                    eta=eta,
                    samples=average_samples,
                    seed=seed,
                    progress=progress,
                ).to_dict(),
            }
            for rho in rhos
        ]
    hessian: dict[str, Any] = {"split": split}
    if eigs:
        top = hessian_eigenvalues(
            obj, k=eigs, method=eig_method, tol=eig_tol, seed=seed, progress=progress
        )
        hessian["eigenvalues"] = list(top.eigenvalues)
        hessian["eigenvalue_settings"] = top.to_dict()
        if smallest:
            bottom = hessian_eigenvalues(
                obj,
                k=eigs,
                which="smallest",
                method=eig_method,
                tol=eig_tol,
                seed=seed,
                progress=progress,
            )
            hessian["smallest_eigenvalues"] = list(bottom.eigenvalues)
            hessian["smallest_eigenvalue_settings"] = bottom.to_dict()
    if trace:
        hessian["trace"] = hessian_trace(
            obj, samples=trace_samples, seed=seed, progress=progress
        ).to_dict()
    if density:
        hessian["density"] = hessian_density(obj, seed=seed, progress=progress).to_dict()
    doc["hessian"] = hessian
    return json_safe(doc)


def measure_checkpoint(
    path: str,
    *,
    model: str | None = None,
    data: str | dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    data_dir: str | None = None,
    download: bool = False,
    trust_code: bool = False,
    **measure_kwargs: Any,
) -> dict[str, Any]:
    """Rebuild the model and data saved in checkpoint ``path`` and :func:`measure` them.

    For a plain state_dict, ``model`` (registry name or ``package.module:factory``) and
    ``data`` name them; ``data_dir``, ``download`` and ``trust_code`` as in
    :func:`load_model_and_data`. The loss is the
    one the checkpoint was trained with unless ``loss`` is given. The document gains
    "checkpoint", "model" and "data" entries.
    """
    check_measure_settings(**measure_kwargs)
    net, dataset, meta = load_model_and_data(
        path,
        model=model,
        data=data,
        model_options=model_options,
        device=device,
        data_dir=data_dir,
        download=download,
        trust_code=trust_code,
    )
    measure_kwargs.setdefault("loss", checkpoint_loss(meta))
    doc = measure(net, dataset, device=device, **measure_kwargs)
    return checkpoint_document(path, meta, doc)


def checkpoint_document(path: str, meta: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure`'s ``doc`` headed by the checkpoint's path, model and data specs."""
    return {"checkpoint": str(path), "model": meta.get("model"), "data": meta.get("data"), **doc}


def format_table(documents: list[dict[str, Any]], labels: list[str]) -> str:
    """A plain-text table, one column per document (as :func:`measure` returns).

    Rows follow the first document; a number another document lacks shows as "-".
    """
    if len(documents) != len(labels) or not documents:
        raise ValueError("format_table needs one label per document, and a document")
    rows: list[tuple[str, list[str]]] = []

    def add(name: str, values: list[Any], fmt: str = "{:.4g}") -> None:
        cells = []
        for v in values:
            if v is None:
                cells.append("-")
            elif isinstance(v, float):
                cells.append(fmt.format(v))
            else:
                cells.append(str(v))
        rows.append((name, cells))

    def entry(doc: dict[str, Any], *keys: Any) -> Any:
        for key in keys:
            try:
                doc = doc[key]
            except (KeyError, IndexError, TypeError):
                return None
        return doc

    for split in ("train", "test"):
        add(f"{split} loss", [entry(d, "loss", split) for d in documents])
        add(f"{split} accuracy", [entry(d, "accuracy", split) for d in documents], "{:.2%}")
    first = documents[0]
    for i, item in enumerate(first["sharpness"]):
        name = f"sharpness {item['norm']} rho={item['rho']:g}"
        name += " adaptive" if item["adaptive"] else ""
        name += f" m={item['m']}" if item["m"] else ""
        add(name, [entry(d, "sharpness", i, "value") for d in documents])
    for i, item in enumerate(first.get("average_sharpness", [])):
        add(
            f"average sharpness {item['norm']} rho={item['rho']:g}",
            [_pm(entry(d, "average_sharpness", i)) for d in documents],
        )
    for i in range(len(first["hessian"].get("eigenvalues", []))):
        add(
            f"Hessian eigenvalue {i + 1}",
            [entry(d, "hessian", "eigenvalues", i) for d in documents],
        )
    for i in range(len(first["hessian"].get("smallest_eigenvalues", []))):
        add(
            f"Hessian smallest {i + 1}",
            [entry(d, "hessian", "smallest_eigenvalues", i) for d in documents],
        )
    if "trace" in first["hessian"]:
        add("Hessian trace", [_pm(entry(d, "hessian", "trace")) for d in documents])
    width = max(len(r[0]) for r in rows)
    cols = [max(len(label), *(len(r[1][j]) for r in rows)) for j, label in enumerate(labels)]
    lines = [
        " " * width + "  " + "  ".join(lab.rjust(c) for lab, c in zip(labels, cols, strict=True))
    ]
    for name, values in rows:
        cells = "  ".join(v.rjust(c) for v, c in zip(values, cols, strict=True))
        lines.append(name.ljust(width) + "  " + cells)
    settings = f"on {first['n_examples']} {first['split']} examples"
    if first["sharpness"]:
        apgd = first["sharpness"][0]
        settings += f"; sharpness by APGD ({apgd['steps']} steps, {apgd['restarts']} restart(s))"
    return "\n".join(lines) + "\n" + settings


def _pm(item: dict[str, Any] | None) -> str | None:
    """ "value ± stderr" of a Monte Carlo estimate."""
    if item is None or item.get("value") is None:
        return None
    return f"{item['value']:.4g} ± {item['stderr']:.2g}"
