"""One model, every number: loss, accuracy, sharpness and Hessian spectrum.

:func:`measure` returns the JSON document behind ``sharpscope measure``: every value
sits next to the settings that produced it (DESIGN.md, "Results").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .checkpoint import load_checkpoint
from .data import Dataset, load_dataset
from .errors import SharpscopeError
from .hessian import hessian_density, hessian_eigenvalues, hessian_trace
from .losses import get_loss
from .objective import Objective
from .sharpness import average_sharpness, sharpness

# Defaults, each with its source.
DEFAULT_SAMPLES = 1024  # issue 3: 1024 examples (or all if fewer)
DEFAULT_RHOS = (0.05,)  # SAM's default radius (Foret et al. 2021)
DEFAULT_TRACE_SAMPLES = 100  # PyHessian's trace budget (maxIter=100)


def measure(
    model: nn.Module,
    dataset: Dataset,
    *,
    loss: str = "ce",
    split: str = "train",
    samples: int | None = DEFAULT_SAMPLES,
    batch_size: int = 512,
    rhos: Sequence[float] = DEFAULT_RHOS,
    norm: str = "l2",
    adaptive: bool = False,
    eta: float = 0.0,
    m: int | None = None,
    steps: int = 20,
    restarts: int = 1,
    average: bool = False,
    average_samples: int = 100,
    eigs: int = 1,
    smallest: bool = False,
    eig_method: str = "lanczos",
    eig_tol: float = 1e-4,
    trace: bool = True,
    trace_samples: int = DEFAULT_TRACE_SAMPLES,
    density: bool = False,
    param_filter: str = "all",
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Measure ``model`` on ``dataset``; return the results document (plain JSON values).

    Loss and accuracy are reported on both splits (``samples`` examples of each); the
    sharpness and Hessian numbers on ``split``. The model is not modified.
    """
    for rho in rhos:
        if not rho > 0:
            raise SharpscopeError(f"--rho must be positive, got {rho}")
    if eigs < 0:
        raise SharpscopeError(f"--eigs must be >= 0, got {eigs}")
    loss_fn = get_loss(loss)
    model = model.to(device)
    dtype = next(model.parameters()).dtype

    def objective(which: str) -> Objective:
        x, y = dataset.examples(which, samples, seed=seed)
        return Objective(
            model,
            (x, y),
            loss_fn,
            param_filter=param_filter,
            batch_size=batch_size,
            device=device,
            accumulate_dtype=torch.float64,
        )

    objectives = {name: objective(name) for name in ("train", "test")}
    obj = objectives[split]
    if eigs > obj.numel:
        raise SharpscopeError(f"--eigs {eigs} exceeds the model's {obj.numel} parameters")
    evaluations = {name: o.evaluate() for name, o in objectives.items()}
    if not math.isfinite(evaluations[split]["loss"]):
        raise SharpscopeError(
            f"the {split} loss is {evaluations[split]['loss']}: nothing to measure"
        )
    doc: dict[str, Any] = {
        "split": split,
        "n_examples": obj.n_examples,
        "n_examples_by_split": {k: o.n_examples for k, o in objectives.items()},
        "n_params": obj.numel,
        "param_filter": param_filter,
        "loss_function": loss,
        "dtype": str(dtype).replace("torch.", ""),
        "seed": seed,
        "loss": {k: v["loss"] for k, v in evaluations.items()},
        "accuracy": {k: v["accuracy"] for k, v in evaluations.items()},
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
        doc["sharpness"].append(result.to_dict())
    if average:
        doc["average_sharpness"] = [
            average_sharpness(
                obj,
                rho=rho,
                norm=norm,
                adaptive=adaptive,
                eta=eta,
                samples=average_samples,
                seed=seed,
                progress=progress,
            ).to_dict()
            for rho in rhos
        ]
    hessian: dict[str, Any] = {}
    if eigs:
        top = hessian_eigenvalues(
            obj, k=eigs, method=eig_method, tol=eig_tol, seed=seed, progress=progress
        )
        hessian["eigenvalues"] = list(top.eigenvalues)
        hessian["eigenvalue_settings"] = top.to_dict()
        if smallest:
            if eig_method == "pyhessian":
                raise SharpscopeError("--smallest needs --eig-method lanczos or power")
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
    return doc


def measure_checkpoint(
    path: str,
    *,
    model: str | None = None,
    data: str | dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    **measure_kwargs: Any,
) -> dict[str, Any]:
    """Rebuild the model and data saved in checkpoint ``path`` and :func:`measure` them.

    For a plain state_dict, ``model`` (registry name or ``package.module:factory``) and
    ``data`` name them. The document gains "checkpoint", "model" and "data" entries.
    """
    net, meta = load_checkpoint(
        path, model=model, data=data, device=device, **(model_options or {})
    )
    data_spec = meta.get("data")
    if data_spec is None:
        raise SharpscopeError(f"{path}: no data set recorded; name one with --data")
    dataset = load_dataset(data_spec).to(device)
    loss = (meta.get("config") or {}).get("loss", "ce")
    doc = measure(
        net, dataset, loss=measure_kwargs.pop("loss", loss), device=device, **measure_kwargs
    )
    return {"checkpoint": str(path), "model": meta.get("model"), "data": data_spec, **doc}


def format_table(documents: list[dict[str, Any]], labels: list[str]) -> str:
    """A plain-text table, one column per document (as :func:`measure` returns)."""
    rows: list[tuple[str, list[str]]] = []

    def add(name: str, values: list[Any], fmt: str = "{:.4g}") -> None:
        rows.append((name, [fmt.format(v) if isinstance(v, float) else str(v) for v in values]))

    for split in ("train", "test"):
        add(f"{split} loss", [d["loss"][split] for d in documents])
        add(f"{split} accuracy", [d["accuracy"][split] for d in documents], "{:.2%}")
    first = documents[0]
    for i, entry in enumerate(first["sharpness"]):
        name = f"sharpness {entry['norm']} rho={entry['rho']:g}"
        name += " adaptive" if entry["adaptive"] else ""
        name += f" m={entry['m']}" if entry["m"] else ""
        add(name, [d["sharpness"][i]["value"] for d in documents])
    for i, entry in enumerate(first.get("average_sharpness", [])):
        add(
            f"average sharpness rho={entry['rho']:g}",
            [_pm(d["average_sharpness"][i]) for d in documents],
        )
    for i in range(len(first["hessian"].get("eigenvalues", []))):
        add(f"Hessian eigenvalue {i + 1}", [d["hessian"]["eigenvalues"][i] for d in documents])
    for i in range(len(first["hessian"].get("smallest_eigenvalues", []))):
        add(
            f"Hessian smallest {i + 1}",
            [d["hessian"]["smallest_eigenvalues"][i] for d in documents],
        )
    if "trace" in first["hessian"]:
        add("Hessian trace", [_pm(d["hessian"]["trace"]) for d in documents])
    width = max(len(r[0]) for r in rows)
    cols = [max(len(label), *(len(r[1][j]) for r in rows)) for j, label in enumerate(labels)]
    lines = [
        " " * width + "  " + "  ".join(lab.rjust(c) for lab, c in zip(labels, cols, strict=True))
    ]
    for name, values in rows:
        lines.append(
            name.ljust(width)
            + "  "
            + "  ".join(v.rjust(c) for v, c in zip(values, cols, strict=True))
        )
    settings = (
        f"on {first['n_examples']} {first['split']} examples; sharpness by APGD "
        f"({first['sharpness'][0]['steps']} steps, {first['sharpness'][0]['restarts']} "
        f"restart(s))"
        if first["sharpness"]
        else f"on {first['n_examples']} examples"
    )
    return "\n".join(lines) + "\n" + settings


def _pm(entry: dict[str, Any]) -> str:
    return f"{entry['value']:.4g} ± {entry['stderr']:.2g}"
