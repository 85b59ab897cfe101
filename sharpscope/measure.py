"""One model, every number: loss, accuracy, sharpness and Hessian spectrum.

:func:`measure` returns the JSON document behind ``sharpscope measure``: every value
sits next to the settings that produced it (docs/design.md, "Contracts"). The work is split so
that a command measuring several checkpoints can refuse bad input before the long part:
:class:`~sharpscope.settings.MeasureSettings` (no model needed), :func:`load_model_and_data`
(one checkpoint), :func:`check_model` (one model: parameter count, finite loss), then
:func:`measure`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .batches import split_parts
from .checkpoint import checkpoint_loss, load_model_and_data
from .data import Dataset
from .errors import SharpscopeError
from .files import json_safe
from .hessian import hessian_density, hessian_eigenvalues, hessian_trace
from .losses import get_loss
from .objective import Objective, model_fits_data
from .settings import MeasureSettings, settings_from, split_keywords
from .sharpness import average_sharpness, sharpness


def _objectives(
    model: nn.Module,
    dataset: Any,
    s: MeasureSettings,
    *,
    loss: str | None,
    device: torch.device | str | None,
    forms: dict[str, Any] | None = None,
    test_data: Any = None,
) -> dict[str, Objective]:
    """One objective per split: of a :class:`Dataset`, on the same seeded ``s.samples``
    examples of each split (data.py); of other data, ``dataset`` as given for
    ``s.split`` and ``test_data`` (if any) for the other split. ``forms``: the
    Objective's loss keywords (loss_fn, batch_loss, examples_in) for other data."""
    if not isinstance(dataset, Dataset):
        other = "test" if s.split == "train" else "train"
        given = {s.split: dataset, other: test_data}
        forms = _with_loss(forms or {}, loss)
        return {
            name: _objective(model, data, s, device, **forms)
            for name, data in given.items()
            if data is not None
        }
    loss_fn = get_loss(loss or "ce")
    return {
        name: _examples_objective(
            model, dataset.examples(name, s.samples, seed=s.seed), loss_fn, s, device
        )
        for name in ("train", "test")
    }


def _with_loss(forms: dict[str, Any], loss: str | None) -> dict[str, Any]:
    """The Objective's loss keywords for data given as is: the named ``loss`` (default
    cross-entropy) unless a ``loss_fn`` or ``batch_loss`` is given."""
    forms = dict(forms)
    if forms.get("loss_fn") is None and forms.get("batch_loss") is None:
        forms["loss_fn"] = get_loss(loss or "ce")
    return forms


def _objective(model: nn.Module, data: Any, s: MeasureSettings, device, **forms) -> Objective:
    """The objective every number of ``measure`` is computed on: ``s``'s parameters and
    batch size, sums in float64 (docs/algorithms.md, pitfalls: small-rho differences)."""
    return Objective(
        model,
        data,
        param_filter=s.param_filter,
        batch_size=s.batch_size,
        device=device,
        accumulate_dtype=torch.float64,
        **forms,
    )


def _examples_objective(model, examples, loss_fn, s: MeasureSettings, device) -> Objective:
    """:func:`_objective` on (inputs, targets) drawn from a data set, float inputs cast to
    the model's dtype (a float64 model is measured in float64)."""
    x, y = examples
    if x.is_floating_point():
        x = x.to(next(model.parameters()).dtype)
    return _objective(model, (x, y), s, device, loss_fn=loss_fn)


def _check_objective(obj: Objective, split: str, eigs: int) -> dict[str, float]:
    if eigs > obj.numel:
        raise SharpscopeError(f"eigs {eigs} exceeds the model's {obj.numel} parameters")
    with model_fits_data():
        evaluation = obj.evaluate()
    if not math.isfinite(evaluation["loss"]):
        raise SharpscopeError(f"the {split} loss is {evaluation['loss']}: nothing to measure")
    return evaluation


def check_model(
    model: nn.Module,
    dataset: Dataset,
    settings: MeasureSettings,
    *,
    loss: str = "ce",
    device: torch.device | str | None = None,
) -> None:
    """Raise :class:`SharpscopeError` if :func:`measure` would refuse this model with
    these ``settings``: more eigenvalues asked for than it has parameters, or a
    non-finite loss. Costs one forward pass over ``settings.samples`` examples."""
    objectives = _objectives(model, dataset, settings, loss=loss, device=device)
    _check_objective(objectives[settings.split], settings.split, settings.eigs)


def measure(
    model: nn.Module,
    dataset: Any,
    settings: MeasureSettings | None = None,
    *,
    loss: str | None = None,
    loss_fn: Callable | None = None,
    batch_loss: Callable | None = None,
    examples_in: Callable | None = None,
    test_data: Any = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    **keywords: Any,
) -> dict[str, Any]:
    """Measure ``model`` on ``dataset`` as ``settings`` say (a :class:`MeasureSettings`,
    or the keywords that build one); return the results document (plain JSON values).

    ``dataset``: a :class:`~sharpscope.data.Dataset` (loss and accuracy on both splits,
    each on ``samples`` examples drawn with ``seed``, all if fewer; ``loss`` names the
    loss, "ce" by default), or data in any form an
    :class:`~sharpscope.objective.Objective` takes (an (inputs, targets) pair, a list of
    batches, a DataLoader), measured as given and reported as split ``split``, with
    ``loss`` or ``loss_fn`` or ``batch_loss`` (and ``examples_in``) as there;
    ``test_data``, in the same form, adds the other split's loss and accuracy. Accuracy
    is None where it is not defined (regression targets, a ``batch_loss``).

    Worst-case sharpness (one entry per rho, :func:`~sharpscope.sharpness.sharpness`),
    the optional average-case sharpness, and the Hessian numbers (``hessian.eigenvalues``
    largest first with ``hessian.eigenvalue_settings``, optional
    ``hessian.smallest_eigenvalues``, ``hessian.trace``, optional ``hessian.density``)
    on ``split``. Every analyzer sees the same examples, in eval mode, summed in float64.
    The model is not modified (not even moved: ``device`` is where the computation
    runs, default the model's). "settings" records every setting; non-finite numbers
    (padding in the density's node table) become None.
    """
    s = settings_from(MeasureSettings, settings, keywords)
    if loss is not None:
        if loss_fn is not None or batch_loss is not None:
            raise SharpscopeError("give loss (a name), loss_fn or batch_loss: one of them")
        get_loss(loss)  # an unknown loss name, before any work
    forms = {"loss_fn": loss_fn, "batch_loss": batch_loss, "examples_in": examples_in}
    parts = None
    if s.subsets > 1 and not isinstance(dataset, Dataset):  # refused before any work
        parts = split_parts(dataset, s.subsets, seed=s.seed)
    objectives = _objectives(
        model, dataset, s, loss=loss, device=device, forms=forms, test_data=test_data
    )
    obj = objectives[s.split]
    evaluations = {s.split: _check_objective(obj, s.split, s.eigs)}
    for name, other in objectives.items():
        if name != s.split:
            with model_fits_data():
                evaluations[name] = other.evaluate()
    splits = ("train", "test")
    doc: dict[str, Any] = {
        "split": s.split,
        "n_examples": obj.n_examples,
        "n_examples_by_split": {k: o.n_examples for k, o in objectives.items()},
        "n_params": obj.numel,
        "param_filter": s.param_filter,
        "loss_function": _loss_name(loss, loss_fn, batch_loss),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "accumulate_dtype": "float64",
        "device": str(obj.device),
        "seed": s.seed,
        "settings": dataclasses.asdict(s),
        "loss": {k: evaluations[k]["loss"] for k in splits if k in evaluations},
        "accuracy": {k: evaluations[k]["accuracy"] for k in splits if k in evaluations},
        "sharpness": _sharpness(obj, s, progress),
    }
    if s.average:
        doc["average_sharpness"] = _average_sharpness(obj, s, progress)
    doc["hessian"] = _hessian(obj, s, progress)
    if s.subsets > 1:
        if parts is None:
            sets = dataset.example_subsets(s.split, s.samples, s.subsets, seed=s.seed)
            loss_fn = get_loss(loss or "ce")
            each = (_examples_objective(model, examples, loss_fn, s, device) for examples in sets)
        else:
            given = _with_loss(forms, loss)
            each = (_objective(model, part, s, device, **given) for part in parts)
        doc["sampling"] = _sampling(each, s)
    return json_safe(doc)


# A standard error above this fraction of the mean: the number depends on which examples
# were drawn more than a comparison can bear (PyHessian users report the top eigenvalue
# changing tenfold between 128-example batches).
LARGE_SAMPLING_ERROR = 0.1


def _sampling(objectives: Iterable[Objective], s: MeasureSettings) -> dict[str, Any]:
    """The sharpness at the first rho and the top eigenvalue on each of ``s.subsets``
    disjoint example sets (``objectives``): every value, their mean ± standard error, and
    a note where the error is large against the value."""
    from .stats import summary

    values: dict[str, list[float]] = {"sharpness": [], "top_eigenvalue": []}
    sizes = []
    for obj in objectives:
        sizes.append(obj.n_examples)
        if s.rhos:
            values["sharpness"].append(_apgd(obj, s, s.rhos[0], False).value)
        if s.eigs:
            top = hessian_eigenvalues(obj, k=1, method=s.eig_method, tol=s.eig_tol, seed=s.seed)
            values["top_eigenvalue"].append(top.eigenvalues[0])
    samples = sizes[0] if len(set(sizes)) == 1 else sizes
    report: dict[str, Any] = {"subsets": s.subsets, "samples": samples, "split": s.split}
    if s.rhos:
        report["rho"] = s.rhos[0]
    notes = []
    for name, vals in values.items():
        if not vals:
            continue
        stat = summary(vals)
        report[name] = {"values": vals, **stat.to_dict()}
        if stat.stderr is not None and stat.stderr > LARGE_SAMPLING_ERROR * abs(stat.mean):
            notes.append(
                f"the {name.replace('_', ' ')} varies between sets of {min(sizes)} examples "
                f"by {stat.stderr / abs(stat.mean):.0%} of its value (s.e. over {s.subsets} "
                "sets): measure on more examples before comparing models"
            )
    report["notes"] = notes
    return report


def _loss_name(loss: str | None, loss_fn: Callable | None, batch_loss: Callable | None) -> str:
    if batch_loss is not None:
        return "batch_loss " + getattr(batch_loss, "__qualname__", type(batch_loss).__name__)
    if loss_fn is not None:
        return getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
    return loss or "ce"


def _sharpness(obj: Objective, s: MeasureSettings, progress: bool) -> list[dict[str, Any]]:
    return [{"split": s.split, **_apgd(obj, s, rho, progress).to_dict()} for rho in s.rhos]


def _apgd(obj: Objective, s: MeasureSettings, rho: float, progress: bool):
    """Worst-case sharpness at ``rho`` with ``s``'s APGD settings."""
    return sharpness(
        obj,
        rho=rho,
        norm=s.norm,
        adaptive=s.adaptive,
        eta=s.eta,
        steps=s.steps,
        restarts=s.restarts,
        m=s.m,
        seed=s.seed,
        progress=progress,
    )


def _average_sharpness(obj: Objective, s: MeasureSettings, progress: bool) -> list[dict]:
    return [
        {
            "split": s.split,
            **average_sharpness(
                obj,
                rho=rho,
                norm=s.norm,
                adaptive=s.adaptive,
                eta=s.eta,
                samples=s.average_samples,
                seed=s.seed,
                progress=progress,
            ).to_dict(),
        }
        for rho in s.rhos
    ]


def _hessian(obj: Objective, s: MeasureSettings, progress: bool) -> dict[str, Any]:
    hessian: dict[str, Any] = {"split": s.split}
    eig = {"k": s.eigs, "method": s.eig_method, "tol": s.eig_tol, "seed": s.seed}
    if s.eigs:
        top = hessian_eigenvalues(obj, progress=progress, **eig)
        hessian["eigenvalues"] = list(top.eigenvalues)
        hessian["eigenvalue_settings"] = top.to_dict()
        if s.smallest:
            bottom = hessian_eigenvalues(obj, which="smallest", progress=progress, **eig)
            hessian["smallest_eigenvalues"] = list(bottom.eigenvalues)
            hessian["smallest_eigenvalue_settings"] = bottom.to_dict()
    if s.trace:
        hessian["trace"] = hessian_trace(
            obj, samples=s.trace_samples, seed=s.seed, progress=progress
        ).to_dict()
    if s.density:
        hessian["density"] = hessian_density(obj, seed=s.seed, progress=progress).to_dict()
    return hessian


def measure_checkpoint(
    path: str,
    settings: MeasureSettings | None = None,
    *,
    loss: str | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    **keywords: Any,
) -> dict[str, Any]:
    """Rebuild the model and data saved in checkpoint ``path`` and :func:`measure` them.

    ``keywords``: fields of :class:`MeasureSettings` (on top of ``settings``) and of
    :class:`~sharpscope.settings.Loading` (how to rebuild the checkpoint: ``model``,
    ``data``, ``data_dir``, ``download``, ``trust_code``, ...). The loss is the one the
    checkpoint was trained with unless ``loss`` is given. The document gains
    "checkpoint", "model" and "data" entries.
    """
    keywords, loading = split_keywords(keywords)
    s = settings_from(MeasureSettings, settings, keywords)
    net, dataset, meta = load_model_and_data(path, device=device, **loading.keywords())
    loss = loss or checkpoint_loss(meta, path)
    doc = measure(net, dataset, s, loss=loss, device=device, progress=progress)
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
    sampling = first.get("sampling")
    for key, name in (("sharpness", "sharpness"), ("top_eigenvalue", "eigenvalue 1")):
        if sampling and key in sampling:
            add(
                f"{name} over {sampling['subsets']} sets",
                [_pm(_as_estimate(entry(d, "sampling", key))) for d in documents],
            )
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


def _as_estimate(item: dict[str, Any] | None) -> dict[str, Any] | None:
    """A summary ({"mean", "stderr"}) as the {"value", "stderr"} that :func:`_pm` shows."""
    if not item:
        return None
    return {"value": item["mean"], "stderr": item["stderr"]}


def _pm(item: dict[str, Any] | None) -> str | None:
    """ "value ± stderr" of a Monte Carlo estimate."""
    if item is None or item.get("value") is None:
        return None
    return f"{item['value']:.4g} ± {item['stderr']:.2g}"
