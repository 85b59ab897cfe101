"""Figures across seeds and optimizers, from saved files: the plots papers on sharpness show.

Each function takes groups, ``{label: [item, ...]}`` (e.g. "SGD" and "SAM", one item per
seed), and an output path, draws every point as the group's mean with its standard error
(:func:`sharpscope.stats.summary`; a group of one shows its value without a bar, and the
legend says n=1), writes the figure (.pdf, .svg or 300 dpi .png, by the extension) and
returns the :class:`~matplotlib.figure.Figure`:

- :func:`plot_training`: the top Hessian eigenvalue (and the sharpness) over training,
  from run folders trained with ``--track-every``, with the learning rate's stability
  threshold 2/η (Cohen et al. 2021, "Gradient descent on neural networks typically
  occurs at the edge of stability", Fig. 1);
- :func:`plot_density`: the Hessian's eigenvalue density by SLQ on a log axis, groups
  overlaid (Ghorbani, Krishnan & Xiao 2019, Figs. 1-2), from measure documents;
- :func:`plot_sharpness_rho`: worst-case sharpness against the radius ρ;
- :func:`plot_eigenvalues`: the top-k Hessian eigenvalues, with λ1/λk in the legend
  when k >= 5 (Foret et al. 2021, Fig. 3, report λ_max and λ_max/λ_5).

Measure documents are what ``sharpscope measure --json`` writes, one per checkpoint
(:func:`read_measure_file` reads such a file into its documents); run folders are what
``sharpscope train`` writes (:func:`read_run`). Every value read is checked (a finite
number where a number is needed), and input without the entry a figure needs is refused
in one line naming the document and the option that makes the entry.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.transforms import ScaledTranslation

from .errors import SharpscopeError, first_line
from .plots import (
    LINE_COLORS,
    LINE_STYLES,
    figure_format,
    figure_width,
    paper_style,
    save_figure,
)
from .stats import Summary, summary

KINDS = ("training", "density", "rho", "eigenvalues")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
# A JSON file larger than this is refused before it is read: a measure document with a
# 10,000-point density is ~1 MB; metrics.jsonl of a 1M-step run tracked every 100 steps
# ~2 MB.
MAX_JSON_BYTES = 256 * 2**20
# Log density axes start at this fraction of the highest density: SLQ's Gaussians fall to
# exactly 0 (and below any useful level) far from the nodes (Ghorbani et al. 2019 show
# about 6-8 decades).
DENSITY_FLOOR = 1e-6
DODGE_PT = 2.5  # groups' error bars drawn this many points apart at the same x
BAND_ALPHA = 0.2


# -- reading -------------------------------------------------------------------------
def _read_text(path: str, what: str) -> str:
    if os.path.isdir(path):
        raise SharpscopeError(f"{path}: a folder, not {what}")
    try:
        size = os.path.getsize(path)
        if size > MAX_JSON_BYTES:
            raise SharpscopeError(f"{path}: {size} bytes, more than {what} ever holds")
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise SharpscopeError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise SharpscopeError(f"{path}: not {what} (not UTF-8 text)") from None
    except OSError as exc:
        raise SharpscopeError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _parse_json(text: str, where: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SharpscopeError(f"{where}: not {what} ({first_line(exc)})") from None


def _is_measure_document(value: Any) -> bool:
    return isinstance(value, dict) and ("sharpness" in value or "hessian" in value)


def read_measure_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The measure documents in a JSON file: ``sharpscope measure --json`` writes
    ``{"command": "measure", "labels": [...], "results": [one per checkpoint]}``; a bare
    document or a list of them is accepted too. Each document is one item of a group."""
    path = os.fspath(path)
    what = "a sharpscope measure JSON file"
    value = _parse_json(_read_text(path, what), path, what)
    if isinstance(value, dict) and "results" in value:
        value = value["results"]
    documents = value if isinstance(value, list) else [value]
    if not documents or not all(_is_measure_document(d) for d in documents):
        raise SharpscopeError(f"{path}: not {what} (no measure results in it)")
    return documents


# -- checks --------------------------------------------------------------------------
def _groups(groups: Mapping[str, Any], what: str) -> list[tuple[str, list[Any]]]:
    """``groups`` as (label, items) pairs; a single item stands for a group of one."""
    if not isinstance(groups, Mapping) or not groups:
        raise SharpscopeError(f"{what}: no groups to plot (give at least one, e.g. SGD)")
    out = []
    for label, items in groups.items():
        if not isinstance(label, str) or not label.strip():
            raise SharpscopeError(f"{what}: a group label must be a non-empty string")
        if isinstance(items, dict | str | os.PathLike | TrainingRun):
            items = [items]
        items = list(items)
        if not items:
            raise SharpscopeError(f"group {label!r} is empty: give it at least one item")
        out.append((label, items))
    return out


def _number(value: Any, where: str) -> float:
    """``value`` as a float: a finite JSON number, else one line naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SharpscopeError(f"{where} is {value!r}, not a finite number")
    return float(value)


def _numbers(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise SharpscopeError(f"{where} is not a non-empty list of numbers")
    return np.array([_number(v, f"{where}[{i}]") for i, v in enumerate(value)])


def _name(doc: Any, label: str, i: int) -> str:
    """How an error names document ``i`` of group ``label``."""
    checkpoint = doc.get("checkpoint") if isinstance(doc, dict) else None
    return f"group {label}, " + (str(checkpoint) if checkpoint else f"document {i + 1}")


def _document(doc: Any, label: str, i: int) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise SharpscopeError(
            f"group {label}, item {i + 1}: a measure document (a dict) is needed, "
            f"got {type(doc).__name__}"
        )
    return doc


def _hessian(doc: dict[str, Any], where: str) -> dict[str, Any]:
    hessian = doc.get("hessian")
    if not isinstance(hessian, dict):
        raise SharpscopeError(f"{where}: no Hessian results in the document")
    return hessian


def _either(values: Sequence[Any], fmt: str = "{}") -> str:
    """One value, or the distinct values joined by "or" (they differ between inputs)."""
    distinct = list(dict.fromkeys(values))
    return " or ".join(fmt.format(v) for v in distinct)


def _examples(splits: Sequence[Any], counts: Sequence[Any]) -> str:
    """E.g. "train, 1024 examples"."""
    parts = []
    known_splits = [s for s in splits if s]
    if known_splits:
        parts.append(_either(known_splits))
    known_counts = [c for c in counts if isinstance(c, int) and not isinstance(c, bool)]
    if known_counts:
        parts.append(_either(known_counts) + " examples")
    return ", ".join(parts)


# -- drawing -------------------------------------------------------------------------
def _style(i: int) -> dict[str, Any]:
    return {"color": LINE_COLORS[i % len(LINE_COLORS)], "linestyle": LINE_STYLES[i % 4]}


def legend_label(label: str, n: int) -> str:
    """A group's legend entry, e.g. "SAM (n=3)": n is the number of seeds."""
    return f"{label} (n={n})"


def _errorbars(
    fig: Figure, ax: Axes, i: int, count: int, x: Sequence[float], stats: Sequence[Summary], label
) -> None:
    """Means with standard-error bars (none for a group of one), drawn a few points
    apart from the other groups' (the data stay at ``x``: the shift is on the page)."""
    shift = (i - (count - 1) / 2) * DODGE_PT / 72
    transform = ax.transData + ScaledTranslation(shift, 0, fig.dpi_scale_trans)
    means = np.array([s.mean for s in stats])
    errors = None if any(s.stderr is None for s in stats) else np.array([s.stderr for s in stats])
    ax.errorbar(
        np.asarray(x, dtype=float),
        means,
        yerr=errors,
        color=LINE_COLORS[i % len(LINE_COLORS)],
        linestyle=LINE_STYLES[i % 4],
        marker=MARKERS[i % len(MARKERS)],
        markersize=3.5,
        capsize=2.5,
        elinewidth=0.8,
        transform=transform,
        label=label,
    )
    # Artists off transData leave the data limits alone: the points and bars set them.
    spread = 0.0 if errors is None else errors
    for y in (means - spread, means + spread):
        ax.update_datalim(np.column_stack([np.asarray(x, dtype=float), y]))
    ax.autoscale_view()


def _figure(columns: int, panels: int = 1) -> tuple[Figure, list[Axes]]:
    width = figure_width(columns)
    if panels == 1:
        fig = Figure(figsize=(width, 2.4), layout="constrained")
        return fig, [fig.subplots()]
    if columns == 1:
        fig = Figure(figsize=(width, 4.0), layout="constrained")
        return fig, list(fig.subplots(panels, 1, sharex=True))
    fig = Figure(figsize=(width, 2.6), layout="constrained")
    return fig, list(fig.subplots(1, panels))


def _finish(fig: Figure, axes: Sequence[Axes], out: str | os.PathLike, title: str | None) -> None:
    for ax in axes:
        ax.grid(True, linewidth=0.3, alpha=0.5)
    if title:
        fig.suptitle(title)
    save_figure(fig, out)


# -- 2. the eigenvalue density ----------------------------------------------------------
def _density(doc: dict[str, Any], where: str) -> tuple[np.ndarray, np.ndarray, dict]:
    density = _hessian(doc, where).get("density")
    if not isinstance(density, dict):
        raise SharpscopeError(f"{where}: no Hessian density (measure with --density --json FILE)")
    grid = _numbers(density.get("grid"), f"{where}: density grid")
    values = _numbers(density.get("density"), f"{where}: density values")
    if grid.size != values.size or grid.size < 2:
        raise SharpscopeError(
            f"{where}: the density has {values.size} values on {grid.size} grid points"
        )
    if not (np.diff(grid) > 0).all():
        raise SharpscopeError(f"{where}: the density grid is not increasing")
    if (values < 0).any():
        raise SharpscopeError(f"{where}: the density has negative values")
    return grid, values, density


def plot_density(
    groups: Mapping[str, Sequence[dict[str, Any]]],
    out: str | os.PathLike,
    *,
    log: bool = True,
    floor: float = DENSITY_FLOOR,
    columns: int = 1,
    title: str | None = None,
) -> Figure:
    """The Hessian's eigenvalue density by SLQ, groups overlaid, on a log density axis
    (Ghorbani et al. 2019, Figs. 1-2), from measure documents with "hessian"."density".

    All densities are put on one grid: the documents' own when they share it, else
    ``max(points)`` points spanning them all, each density interpolated linearly and 0
    outside its own grid (its Gaussians have decayed there). Per group, the mean over its
    documents with a band of ± one standard error. ``log``: values below ``floor`` times
    the highest mean are drawn at that level, so zeros do not break the axis.
    """
    figure_format(out)
    if not 0 < floor < 1:
        raise SharpscopeError(f"floor must lie in (0, 1), got {floor}")
    pairs = _groups(groups, "a density figure")
    read = []  # (label, [(grid, values, density)])
    for label, docs in pairs:
        read.append(
            (
                label,
                [_density(_document(d, label, i), _name(d, label, i)) for i, d in enumerate(docs)],
            )
        )
    grids = [g for _, items in read for g, _, _ in items]
    if all(g.shape == grids[0].shape and (g == grids[0]).all() for g in grids):
        common = grids[0]
    else:
        lo, hi = min(float(g[0]) for g in grids), max(float(g[-1]) for g in grids)
        common = np.linspace(lo, hi, max(g.size for g in grids))
    curves = []
    for label, items in read:
        stacked = np.stack([np.interp(common, g, v, left=0.0, right=0.0) for g, v, _ in items])
        stats = [summary(stacked[:, j]) for j in range(common.size)]
        mean = np.array([s.mean for s in stats])
        se = None if len(items) == 1 else np.array([s.stderr for s in stats])
        curves.append((label, len(items), mean, se))
    peak = max(float(mean.max()) for _, _, mean, _ in curves)
    if not peak > 0:
        raise SharpscopeError("every density is 0: nothing to draw")
    level = floor * peak if log else -np.inf

    with paper_style():
        fig, (ax,) = _figure(columns)
        for i, (label, n, mean, se) in enumerate(curves):
            style = _style(i)
            ax.plot(common, np.maximum(mean, level), label=legend_label(label, n), **style)
            if se is not None:
                low, high = np.maximum(mean - se, level), np.maximum(mean + se, level)
                ax.fill_between(common, low, high, color=style["color"], alpha=BAND_ALPHA, lw=0)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(level, 3.0 * peak)
        else:
            ax.set_ylim(0.0, 1.05 * peak)
        ax.margins(x=0)
        docs = [d for _, items in read for _, _, d in items]
        hessians = [_hessian(doc, "") for _, doc_list in pairs for doc in doc_list]
        where = _examples([h.get("split") for h in hessians], [d.get("n_examples") for d in docs])
        ax.set_xlabel(f"eigenvalue of the Hessian ({where})" if where else "eigenvalue")
        runs = _either([d.get("runs") for d in docs])
        steps = _either([d.get("steps") for d in docs])
        ax.set_ylabel(f"density\n(SLQ, {runs} runs × {steps} Lanczos steps)")
        ax.legend(frameon=False)
        _finish(fig, [ax], out, title)
    return fig


# -- 3. sharpness against rho -------------------------------------------------------------
_SHARPNESS_SAME = ("norm", "adaptive", "m", "split")  # what makes it one quantity


def plot_sharpness_rho(
    groups: Mapping[str, Sequence[dict[str, Any]]],
    out: str | os.PathLike,
    *,
    log_x: bool | None = None,
    log: bool = False,
    columns: int = 1,
    title: str | None = None,
) -> Figure:
    """Worst-case sharpness against ρ, one curve per group with standard-error bars,
    from measure documents measured at several ρ ("sharpness": entries with "rho" and
    "value"). Every document of a group must have the same ρ; every entry of every
    group the same norm, adaptivity, m and split (one quantity on one axis).
    ``log_x``: None picks a log ρ axis when the ρ span a decade. ``log``: log y."""
    figure_format(out)
    pairs = _groups(groups, "a sharpness figure")
    series = []
    entries: list[dict[str, Any]] = []
    for label, docs in pairs:
        by_rho: dict[float, list[float]] = {}
        sets = []
        for i, doc in enumerate(docs):
            where = _name(doc, label, i)
            items = _document(doc, label, i).get("sharpness")
            if not isinstance(items, list) or not items:
                raise SharpscopeError(
                    f"{where}: no worst-case sharpness (measure with --rho R [R ...])"
                )
            rhos = []
            for item in items:
                if not isinstance(item, dict):
                    raise SharpscopeError(f"{where}: a sharpness entry is not a JSON object")
                rho = _number(item.get("rho"), f"{where}: rho")
                if rho in rhos:
                    raise SharpscopeError(f"{where}: sharpness at ρ = {rho:g} appears twice")
                rhos.append(rho)
                value = _number(item.get("value"), f"{where}: sharpness at ρ = {rho:g}")
                by_rho.setdefault(rho, []).append(value)
                entries.append(
                    {**item, "n_examples": item.get("n_examples", doc.get("n_examples"))}
                )
            sets.append(tuple(sorted(rhos)))
        if len(set(sets)) > 1:
            raise SharpscopeError(
                f"group {label}: its documents were measured at different ρ "
                f"({' vs '.join(_either(s, '{:g}') for s in dict.fromkeys(sets))})"
            )
        rhos = sorted(by_rho)
        series.append((label, len(docs), rhos, [summary(by_rho[r]) for r in rhos]))
    for key in _SHARPNESS_SAME:
        values = [e.get(key) for e in entries]
        if len(set(map(repr, values))) > 1:
            raise SharpscopeError(
                f"the documents measured sharpness with different {key} ({_either(values)}): "
                "plot them separately"
            )
    all_rhos = [r for _, _, rhos, _ in series for r in rhos]
    if log_x is None:
        log_x = min(all_rhos) > 0 and max(all_rhos) / min(all_rhos) >= 10

    with paper_style():
        fig, (ax,) = _figure(columns)
        for i, (label, n, rhos, stats) in enumerate(series):
            _errorbars(fig, ax, i, len(series), rhos, stats, legend_label(label, n))
        first = entries[0]
        norm = ("adaptive " if first.get("adaptive") else "") + str(first.get("norm"))
        ax.set_xlabel(f"ρ  (radius of the {norm} ball)")
        settings = [norm]
        if first.get("m"):
            settings.append(f"m = {first['m']}")
        settings.append(_either([e.get("steps") for e in entries]) + " APGD steps")
        restarts = [e.get("restarts") for e in entries]
        if any(r != 1 for r in restarts):
            settings.append(_either(restarts) + " restarts")
        where = _examples([e.get("split") for e in entries], [e.get("n_examples") for e in entries])
        if where:
            settings.append(where)
        ax.set_ylabel("worst-case sharpness\n(" + ", ".join(settings) + ")")
        if log_x:
            ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
        ax.legend(frameon=False)
        _finish(fig, [ax], out, title)
    return fig


# -- 4. the top-k eigenvalues -------------------------------------------------------------
def plot_eigenvalues(
    groups: Mapping[str, Sequence[dict[str, Any]]],
    out: str | os.PathLike,
    *,
    log: bool | None = None,
    columns: int = 1,
    title: str | None = None,
) -> Figure:
    """The top-k Hessian eigenvalues of each group against their index 1..k, with
    standard-error bars, from measure documents ("hessian"."eigenvalues", largest
    first; every document the same k). When k >= 5 the legend gives each group's
    λ1/λk, the mean ± standard error of the documents' own ratios (Foret et al. 2021,
    Fig. 3, report λ_max/λ_5), where every λk is positive. ``log``: None picks a log y
    axis when every eigenvalue is positive."""
    figure_format(out)
    pairs = _groups(groups, "an eigenvalue figure")
    series = []
    found: list[tuple[int, str]] = []
    settings = []
    for label, docs in pairs:
        rows = []
        for i, doc in enumerate(docs):
            where = _name(doc, label, i)
            hessian = _hessian(_document(doc, label, i), where)
            if not hessian.get("eigenvalues"):
                raise SharpscopeError(f"{where}: no Hessian eigenvalues (measure with --eigs K)")
            rows.append(_numbers(hessian["eigenvalues"], f"{where}: eigenvalues"))
            found.append((rows[-1].size, where))
            extra = hessian.get("eigenvalue_settings")
            settings.append(extra if isinstance(extra, dict) else {})
            settings[-1] = {"split": hessian.get("split", doc.get("split")), **settings[-1]}
        if len({k for k, _ in found}) > 1:
            (k1, w1), (k2, w2) = found[0], next(f for f in found if f[0] != found[0][0])
            raise SharpscopeError(
                f"mismatched k: {k1} eigenvalues in {w1}, {k2} in {w2} (measure all with "
                "the same --eigs)"
            )
        values = np.stack(rows)
        stats = [summary(values[:, j]) for j in range(values.shape[1])]
        ratio = None
        if values.shape[1] >= 5 and (values[:, -1] > 0).all():
            ratio = summary(values[:, 0] / values[:, -1])
        series.append((label, len(docs), stats, ratio, values))
    k = found[0][0]
    if log is None:
        log = all((values > 0).all() for *_, values in series)

    with paper_style():
        fig, (ax,) = _figure(columns)
        for i, (label, n, stats, ratio, _) in enumerate(series):
            name = legend_label(label, n)
            if ratio is not None:
                name += f", λ1/λ{k} = {ratio}"
            _errorbars(fig, ax, i, len(series), range(1, k + 1), stats, name)
        ax.set_xlabel("index i  (λ1 ≥ λ2 ≥ …)")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        where = _examples(
            [s.get("split") for s in settings], [s.get("n_examples") for s in settings]
        )
        methods = [s.get("method") for s in settings if s.get("method")]
        detail = ", ".join(p for p in (_either(methods) if methods else "", where) if p)
        ax.set_ylabel("Hessian eigenvalue λi" + (f"\n({detail})" if detail else ""))
        if log:
            ax.set_yscale("log")
        ax.legend(frameon=False)
        _finish(fig, [ax], out, title)
    return fig


# -- 5. a sharpness measure against generalization ---------------------------------------
def plot_correlation(
    result: Mapping[str, Any],
    out: str | os.PathLike,
    *,
    columns: int = 2,
    title: str | None = None,
) -> Figure:
    """One scatter panel per measure of ``result`` (what
    :func:`sharpscope.groups.correlations` returns: the models' values of each measure
    against their generalization gap), each titled with Kendall's tau and its 95%
    interval (Jiang et al. 2020 show such a plot per measure)."""
    figure_format(out)
    measures = result.get("measures") or {}
    if not measures:
        raise SharpscopeError("no measure to correlate: measure 3 checkpoints or more")
    gaps = _numbers(result.get("gaps"), "the generalization gaps")
    with paper_style():
        fig = Figure(figsize=(figure_width(columns), 2.4), layout="constrained")
        axes = list(np.atleast_1d(fig.subplots(1, len(measures))))
        for ax, (name, r) in zip(axes, measures.items(), strict=True):
            values = _numbers(r.get("values"), f"the values of {name}")
            if values.shape != gaps.shape:
                raise SharpscopeError(f"{name}: {len(values)} values for {len(gaps)} models")
            ax.scatter(values, gaps, s=12, **{"color": _style(0)["color"]})
            ax.set_xlabel(name)
            ax.set_title(f"τ = {r['tau']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]", fontsize=8)
        axes[0].set_ylabel(str(result.get("generalization", "generalization gap")))
        _finish(fig, axes, out, title)
    return fig


# The training figure reads run folders; it lives in training_figure.py, exported here too.
from .training_figure import (  # noqa: E402, F401 (re-exported)
    TrainingRun,
    plot_training,
    read_run,
    stability_threshold,
)

PLOTTERS = {
    "training": plot_training,
    "density": plot_density,
    "rho": plot_sharpness_rho,
    "eigenvalues": plot_eigenvalues,
}
