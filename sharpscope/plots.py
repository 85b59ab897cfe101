"""Paper-quality figures of loss landscapes (matplotlib, Agg backend).

Reads the surfaces :mod:`sharpscope.surface` holds (``Surface``: ``kind`` "1d", "2d"
or "interpolation"; ``coords_a`` (nx,), ``coords_b`` (ny,) for 2-D; ``loss`` and
``accuracy`` (nx,) or (ny, nx) with rows = ``coords_b`` (direction 2) and columns =
``coords_a`` (direction 1); NaN = not computed; ``settings`` a dict; optional
``trajectory`` (k, 2) in (a, b) coordinates) and draws them:

- :func:`plot_1d`: 1-D and interpolation curves, several overlaid and labeled;
- :func:`plot_2d`: filled contours with contour lines, a 3-D surface, or a heatmap;
  several surfaces side by side share one color scale, one set of contour levels
  (:func:`shared_color_scale`) and one colorbar, so minima compare at a glance.

Paper style: one-column (3.3 in) and two-column (6.9 in) widths, 8 pt fonts, the
viridis colormap (perceptually uniform and colorblind-safe; van der Walt & Smith 2015),
Okabe-Ito line colors, vector PDF/SVG or 300 dpi PNG chosen by the file's extension,
written atomically. Unfinished (NaN) points are drawn as gaps, never as zeros.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib import cm, colors, ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .errors import SharpscopeError
from .files import atomic_write

# Figures are made with matplotlib.figure.Figure directly, never through pyplot: no
# GUI backend is needed, the output is the same on every machine, and importing
# sharpscope leaves a notebook's backend (inline, widget) as the user set it.

FORMATS = ("pdf", "png", "svg")
STYLES = ("contour", "surface3d", "heatmap")
# Common two-column paper geometry (NeurIPS / ICML / IEEE): a column is ~3.25-3.5 in,
# the full text width ~6.75-7 in.
COLUMN_WIDTH_IN = {1: 3.3, 2: 6.9}
PNG_DPI = 300  # the usual print requirement for raster figures
FONT_SIZE = 8  # readable at one-column width; journals ask for >= 6-7 pt after scaling
N_LEVELS = 16  # contour intervals: dense enough to show a basin's shape, lines still apart
# Levels are log-spaced when the values span at least two decades (max / min >= 100):
# trained minima sit at losses ~1e-3 while the edges of a [-1, 1] plane reach ~1-10, and
# linear levels would then put the whole basin inside the lowest level.
LOG_RANGE_RATIO = 100.0
COLORMAP = "viridis"  # perceptually uniform, colorblind-safe (van der Walt & Smith 2015)
# Okabe & Ito (2008) colorblind-safe palette, with distinct dashes for grayscale print.
LINE_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
LINE_STYLES = ("-", "--", "-.", ":")
TRAJECTORY_COLOR = "#D55E00"  # vermillion: stands out on every part of viridis

_RC = {
    "font.size": FONT_SIZE,
    "axes.titlesize": FONT_SIZE,
    "axes.labelsize": FONT_SIZE,
    "xtick.labelsize": FONT_SIZE - 1,
    "ytick.labelsize": FONT_SIZE - 1,
    "legend.fontsize": FONT_SIZE - 1,
    "figure.titlesize": FONT_SIZE + 1,
    "axes.linewidth": 0.6,
    "lines.linewidth": 1.2,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "pdf.fonttype": 42,  # embed TrueType, not Type 3: what publishers' checkers require
    "ps.fonttype": 42,
    "svg.fonttype": "path",  # text as outlines: renders the same without the font
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
}


# -- color scale ---------------------------------------------------------------------
@dataclass(frozen=True)
class ColorScale:
    """One color scale shared by several panels.

    ``levels`` (n + 1 values) are the contour boundaries, increasing and covering
    [vmin, vmax]; ``log`` says they are log-spaced and colors follow log(value).
    """

    levels: tuple[float, ...]
    vmin: float
    vmax: float
    log: bool

    def norm(self) -> colors.Normalize:
        """The value -> [0, 1] map every panel uses."""
        lo, hi = float(self.levels[0]), float(self.levels[-1])
        return colors.LogNorm(lo, hi) if self.log else colors.Normalize(lo, hi)

    def to_dict(self) -> dict[str, Any]:
        return {
            "levels": list(self.levels),
            "vmin": self.vmin,
            "vmax": self.vmax,
            "log": self.log,
        }


def shared_color_scale(
    values: Sequence[np.ndarray],
    *,
    n_levels: int = N_LEVELS,
    log: bool | None = None,
    vmax: float | None = None,
) -> ColorScale:
    """One set of contour levels for all of ``values`` (arrays of any shape, NaN ignored).

    ``log=None`` picks log-spaced levels when every finite value is positive and
    max / min >= :data:`LOG_RANGE_RATIO`; ``True`` forces them (values <= 0 are then
    drawn in the lowest color); ``False`` forces linear ones. ``vmax`` caps the scale
    (values above it are drawn in the top color), as Li et al. (2018) cap the loss
    at 10 in their contour plots. Linear levels are round numbers
    (:class:`matplotlib.ticker.MaxNLocator`); log levels are geometric.
    """
    if n_levels < 2:
        raise SharpscopeError(f"need at least 2 contour levels, got {n_levels}")
    finite = np.concatenate([np.asarray(v, dtype=float).ravel() for v in values])
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        raise SharpscopeError("nothing to plot: every point is NaN (no finished points)")
    lo, hi = float(finite.min()), float(finite.max())
    if vmax is not None:
        if not vmax > lo:
            raise SharpscopeError(f"--vmax {vmax:g} is not above the smallest value {lo:g}")
        hi = min(hi, float(vmax))
    positive = finite[finite > 0]
    if log is None:
        log = lo > 0 and hi / lo >= LOG_RANGE_RATIO
    if log:
        if positive.size == 0:
            raise SharpscopeError("a log scale needs positive values; every value is <= 0")
        lo = float(positive.min())
        if hi <= lo:
            hi = lo * 10.0
        levels = np.geomspace(lo, hi, n_levels + 1)
    else:
        if hi <= lo:  # a flat surface: widen so the levels are distinct
            pad = 0.5 * abs(lo) if lo != 0 else 0.5
            lo, hi = lo - pad, hi + pad
        ticks = ticker.MaxNLocator(n_levels, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
        # The round ticks cover [lo, hi]; keep the last one <= lo through the first >= hi.
        first = max(int(np.searchsorted(ticks, lo, side="right")) - 1, 0)
        last = min(int(np.searchsorted(ticks, hi, side="left")), len(ticks) - 1)
        levels = ticks[first : last + 1]
    return ColorScale(levels=tuple(float(v) for v in levels), vmin=lo, vmax=hi, log=bool(log))


# -- labels --------------------------------------------------------------------------
_DIRECTION_NAMES = {  # the "directions" a surface's settings record (directions.py)
    "filter": "filter-normalized direction",
    "layer": "layer-normalized direction",
    "none": "random direction",
    "hessian": "Hessian eigenvector",
    "pca": "principal component",
}


def direction_name(settings: dict[str, Any]) -> str:
    """What a surface's directions are, e.g. "filter-normalized direction", from its
    settings' "directions"."""
    return _DIRECTION_NAMES.get(str(settings.get("directions", "")).lower(), "direction")


def axis_label(settings: dict[str, Any], axis: int, endpoints: tuple[str, str] = ("A", "B")) -> str:
    """What coordinate ``axis`` (1 or 2) of a surface is, e.g. "α (filter-normalized
    direction 1)", or "t (interpolation: 0 = A, 1 = B)" for an interpolation."""
    if settings.get("kind") == "interpolation":
        return f"t  (interpolation: 0 = {endpoints[0]}, 1 = {endpoints[1]})"
    symbol = "α" if axis == 1 else "β"
    return f"{symbol}  ({direction_name(settings)} {axis})"


def quantity_label(settings: dict[str, Any], quantity: str) -> str:
    """E.g. "train loss" or "test accuracy (%)"."""
    split = settings.get("split")
    prefix = f"{split} " if split else ""
    return f"{prefix}{quantity}" + (" (%)" if quantity == "accuracy" else "")


def surface_label(surface: Any, fallback: str) -> str:
    """A surface's legend label: its settings' "label" or ``fallback``."""
    label = (surface.settings or {}).get("label")
    return str(label) if label else fallback


# -- output --------------------------------------------------------------------------
def figure_format(out: str | os.PathLike) -> str:
    """The format named by ``out``'s extension (pdf, png or svg); checks its folder."""
    out = os.fspath(out)
    ext = os.path.splitext(out)[1].lower().lstrip(".")
    if ext not in FORMATS:
        raise SharpscopeError(
            f"{out}: unknown figure format {ext or '(none)'!r}; use .pdf, .png or .svg"
        )
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise SharpscopeError(f"cannot write {out}: folder {folder} does not exist")
    return ext


def save_figure(fig: Figure, out: str | os.PathLike) -> None:
    """Write ``fig`` to ``out`` atomically in the format of its extension."""
    fmt = figure_format(out)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format=fmt, dpi=PNG_DPI))


@contextmanager
def paper_style() -> Iterator[None]:
    """The rcParams of every sharpscope figure (fonts, line widths, font embedding)."""
    with matplotlib.rc_context(_RC):
        yield


def figure_width(columns: int) -> float:
    """Inches of a figure ``columns`` (1 or 2) columns of a paper wide."""
    if columns not in COLUMN_WIDTH_IN:
        raise SharpscopeError(f"--columns must be 1 or 2, got {columns}")
    return COLUMN_WIDTH_IN[columns]


def _labels(surfaces: Sequence[Any], labels: Sequence[str] | None) -> list[str]:
    if labels is not None and len(labels) != len(surfaces):
        raise SharpscopeError(
            f"got {len(labels)} labels for {len(surfaces)} surfaces; give one label per surface"
        )
    if labels is not None:
        return [str(label) for label in labels]
    return [surface_label(s, f"surface {i + 1}") for i, s in enumerate(surfaces)]


def _check_kinds(surfaces: Sequence[Any], allowed: tuple[str, ...], what: str) -> None:
    if not surfaces:
        raise SharpscopeError("no surfaces to plot")
    kinds = {s.kind for s in surfaces}
    if not kinds <= set(allowed):
        raise SharpscopeError(
            f"{what} draws {' or '.join(allowed)} surfaces, got {', '.join(sorted(kinds))}"
        )
    if len(kinds) > 1:
        raise SharpscopeError(
            f"cannot overlay {' and '.join(sorted(kinds))} surfaces: their x axes differ"
        )


# -- 1-D -----------------------------------------------------------------------------
def plot_1d(
    surfaces: Sequence[Any],
    out: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    accuracy: bool = True,
    log: bool = False,
    columns: int = 1,
    title: str | None = None,
    endpoints: tuple[str, str] = ("A", "B"),
) -> None:
    """Loss (and accuracy) curves of 1-D or interpolation surfaces, overlaid.

    One panel for the loss (log y axis when ``log``) and, when ``accuracy`` and every
    surface has it, one for the accuracy in %, stacked at one-column width and side by
    side at two. NaN points are gaps in the curves. For interpolation surfaces the
    endpoints t = 0 and t = 1 are marked with the names ``endpoints``. Writes ``out``
    (.pdf, .png or .svg, by its extension).
    """
    figure_format(out)
    _check_kinds(surfaces, ("1d", "interpolation"), "a 1-D plot")
    names = _labels(surfaces, labels)
    for s in surfaces:
        if np.asarray(s.loss).ndim != 1:
            raise SharpscopeError(f"a 1-D plot needs 1-D loss arrays, got shape {s.loss.shape}")
        if not np.isfinite(np.asarray(s.loss, dtype=float)).any():
            raise SharpscopeError(
                f"nothing to plot for {surface_label(s, 'a curve')}: every point is NaN or infinite"
            )
    accuracy = accuracy and all(_has_accuracy(s) for s in surfaces)
    width = figure_width(columns)
    with paper_style():
        if accuracy and columns == 1:
            fig = Figure(figsize=(width, 3.6), layout="constrained")
            axes = fig.subplots(2, 1, sharex=True)
        elif accuracy:
            fig = Figure(figsize=(width, 2.6), layout="constrained")
            axes = fig.subplots(1, 2)
        else:
            fig = Figure(figsize=(width, 2.4), layout="constrained")
            ax = fig.subplots()
            axes = [ax]
        settings = surfaces[0].settings or {}
        for i, (s, name) in enumerate(zip(surfaces, names, strict=True)):
            style = {
                "color": LINE_COLORS[i % len(LINE_COLORS)],
                "linestyle": LINE_STYLES[i % len(LINE_STYLES)],
                "label": name,
            }
            loss = np.asarray(s.loss, dtype=float)
            if log:
                loss = np.where(loss > 0, loss, np.nan)  # log of <= 0 is undefined: a gap
            axes[0].plot(s.coords_a, loss, **style)
            if accuracy:
                axes[1].plot(s.coords_a, 100.0 * np.asarray(s.accuracy, dtype=float), **style)
        axes[0].set_ylabel(quantity_label(settings, "loss"))
        if log:
            axes[0].set_yscale("log")
        if accuracy:
            axes[1].set_ylabel(quantity_label(settings, "accuracy"))
        xlabel = axis_label(settings, 1, endpoints)
        for ax in axes:
            ax.xaxis.set_major_locator(_coordinate_ticks())
            if surfaces[0].kind == "interpolation":
                for t in (0.0, 1.0):
                    ax.axvline(t, color="0.6", linewidth=0.6, linestyle=":", zorder=0)
            else:
                ax.axvline(0.0, color="0.6", linewidth=0.6, linestyle=":", zorder=0)
            ax.grid(True, linewidth=0.3, alpha=0.5)
            ax.margins(x=0)
        if accuracy and columns == 1:
            axes[1].set_xlabel(xlabel)
        else:
            for ax in axes:
                ax.set_xlabel(xlabel)
        if surfaces[0].kind == "interpolation":
            _mark_endpoints(axes[0], endpoints)
        if len(surfaces) > 1:  # one curve needs no legend: the axes say what it is
            axes[0].legend(frameon=False)
        if title:
            fig.suptitle(title)
        save_figure(fig, out)


def _coordinate_ticks() -> ticker.Locator:
    """About 5 round ticks (-1, -0.5, 0, 0.5, 1 on the default range)."""
    return ticker.MaxNLocator(4, steps=[1, 2, 5, 10])


def _mark_endpoints(ax: Axes, endpoints: tuple[str, str]) -> None:
    """The endpoints' names above t = 0 and t = 1 (interpolation plots)."""
    for t, name in zip((0.0, 1.0), endpoints, strict=True):
        ax.annotate(
            name,
            xy=(t, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=FONT_SIZE - 1,
        )


# -- 2-D -----------------------------------------------------------------------------
def plot_2d(
    surfaces: Sequence[Any],
    out: str | os.PathLike,
    *,
    style: str = "contour",
    quantity: str = "loss",
    labels: Sequence[str] | None = None,
    log: bool | None = None,
    n_levels: int = N_LEVELS,
    vmax: float | None = None,
    columns: int | None = None,
    title: str | None = None,
    trajectory: bool = True,
) -> ColorScale:
    """2-D surfaces side by side, sharing one color scale and one colorbar.

    ``style``: "contour" (filled contours with contour lines at the same levels),
    "surface3d" (matplotlib 3-D surface at full grid resolution; a log z axis when the
    scale is log) or "heatmap" (one cell per grid point).
    ``quantity``: "loss" or "accuracy" (in %). ``log``: None = log-spaced levels when
    the values span two decades (:func:`shared_color_scale`). ``columns``: figure width,
    1 (3.3 in) or 2 (6.9 in); None = 1 for one surface, 2 for several. A surface's
    ``trajectory`` (k, 2), when present and ``trajectory`` is true, is drawn over the
    contour and heatmap styles. Unfinished (NaN) points are left blank.
    Returns the shared :class:`ColorScale`.
    """
    figure_format(out)
    if style not in STYLES:
        raise SharpscopeError(f"unknown style {style!r}: choose {', '.join(STYLES)}")
    if quantity not in ("loss", "accuracy"):
        raise SharpscopeError(f"unknown quantity {quantity!r}: choose loss or accuracy")
    _check_kinds(surfaces, ("2d",), "a 2-D plot")
    if any(min(np.shape(s.loss)) < 2 for s in surfaces):
        raise SharpscopeError("a 2-D plot needs at least 2 points along each axis")
    names = _labels(surfaces, labels)
    grids = [_grid(s, quantity) for s in surfaces]
    if quantity == "accuracy":
        log = False  # accuracy in % is bounded: a log scale would only distort it
    scale = shared_color_scale(grids, n_levels=n_levels, log=log, vmax=vmax)
    n = len(surfaces)
    columns = columns if columns is not None else (1 if n == 1 else 2)
    width = figure_width(columns)
    shared_y = _same_coords(surfaces)
    settings = surfaces[0].settings or {}
    with paper_style():
        if style == "surface3d":
            panel = (width - 1.0) / n
            fig = Figure(figsize=(width, 0.85 * panel + 0.4), layout="constrained")
            axes = [fig.add_subplot(1, n, i + 1, projection="3d") for i in range(n)]
            cax = None
        else:
            fig, axes, cax = _panel_grid(width, n, shared_y, bool(title))
        # Values above a --vmax cap take the top color; the colorbar gets a triangle.
        extend = "max" if _largest(grids) > scale.levels[-1] else "neither"
        mappable = None
        for ax, s, grid, name in zip(axes, surfaces, grids, names, strict=True):
            mappable = _draw_panel(ax, s, grid, scale, style, trajectory, extend)
            ax.set_title(name)
        for i, ax in enumerate(axes):
            s_settings = surfaces[i].settings or {}
            ax.xaxis.set_major_locator(_coordinate_ticks())
            ax.yaxis.set_major_locator(_coordinate_ticks())
            if style == "surface3d":
                # Long labels collide in 3-D: symbols on the axes, their meaning below.
                ax.set_xlabel("α", labelpad=-4)
                ax.set_ylabel("β", labelpad=-4)
            else:
                ax.set_xlabel(axis_label(s_settings, 1))
                if i == 0 or not shared_y:
                    ax.set_ylabel(axis_label(s_settings, 2))
        if style == "surface3d":
            name = direction_name(settings)
            fig.supxlabel(f"α, β: {name}s 1 and 2", fontsize=FONT_SIZE - 1)
        if cax is None:  # 3-D: placed by the layout engine
            cbar = fig.colorbar(mappable, ax=axes, shrink=0.7, aspect=25, pad=0.06, extend=extend)
        else:
            cbar = fig.colorbar(mappable, cax=cax, extend=extend)
        # In 3-D the colorbar also names the z axis (a z label collides with it).
        suffix = " (height and color)" if style == "surface3d" else ""
        cbar.set_label(quantity_label(settings, quantity) + suffix)
        if scale.log:
            # Decade ticks, not the (geometric, unround) contour levels.
            cbar.locator = ticker.LogLocator()
            cbar.formatter = ticker.LogFormatterSciNotation()
            cbar.update_ticks()
        else:
            cbar.ax.minorticks_off()
        if title:
            fig.suptitle(title, y=1.0, va="top")
        save_figure(fig, out)
    return scale


# Fixed margins (inches) of a row of 2-D panels: room for tick labels and axis labels
# (left, bottom), panel titles (top), the colorbar and its label (right).
_LEFT, _BOTTOM, _TOP, _GAP, _GAP_LABELED = 0.55, 0.45, 0.22, 0.3, 0.6
_CBAR_PAD, _CBAR_WIDTH, _CBAR_LABEL = 0.1, 0.12, 0.55


def _panel_grid(
    width: float, n: int, shared_y: bool, title: bool
) -> tuple[Figure, list[Axes], Axes]:
    """A row of ``n`` square panels and a colorbar axis exactly as tall as they are.

    Placed by hand, in inches: a layout engine sizes the colorbar to the panels'
    allotted boxes, which are taller than the square panels drawn in them.
    """
    gap = _GAP if shared_y else _GAP_LABELED
    right = _CBAR_PAD + _CBAR_WIDTH + _CBAR_LABEL
    panel = (width - _LEFT - right - (n - 1) * gap) / n
    top = _TOP + (0.2 if title else 0.0)
    height = _BOTTOM + panel + top
    fig = Figure(figsize=(width, height))
    axes = []
    for i in range(n):
        left = _LEFT + i * (panel + gap)
        rect = (left / width, _BOTTOM / height, panel / width, panel / height)
        axes.append(fig.add_axes(rect, sharey=axes[0] if shared_y and axes else None))
    if shared_y:
        for ax in axes[1:]:
            ax.tick_params(labelleft=False)
    left = _LEFT + n * panel + (n - 1) * gap + _CBAR_PAD
    cax = fig.add_axes((left / width, _BOTTOM / height, _CBAR_WIDTH / width, panel / height))
    return fig, axes, cax


def _has_accuracy(surface: Any) -> bool:
    """Whether a surface has accuracy values: not for a loss without class targets (a
    regression, a batch_loss), where every entry is NaN."""
    acc = surface.accuracy
    return acc is not None and bool(np.isfinite(np.asarray(acc, dtype=float)).any())


def _grid(surface: Any, quantity: str) -> np.ndarray:
    values = surface.loss if quantity == "loss" else surface.accuracy
    if values is None or (quantity == "accuracy" and not _has_accuracy(surface)):
        raise SharpscopeError(f"the surface has no {quantity} values")
    grid = np.asarray(values, dtype=float)
    if quantity == "accuracy":
        grid = 100.0 * grid
    ny, nx = len(surface.coords_b), len(surface.coords_a)
    if grid.shape != (ny, nx):
        raise SharpscopeError(
            f"a 2-D surface's {quantity} must have shape (len(coords_b), len(coords_a)) = "
            f"({ny}, {nx}), got {grid.shape}"
        )
    return grid


def _largest(grids: Sequence[np.ndarray]) -> float:
    return max((float(np.nanmax(g)) for g in grids if np.isfinite(g).any()), default=-math.inf)


def _same_coords(surfaces: Sequence[Any]) -> bool:
    first = surfaces[0]
    return all(
        np.array_equal(s.coords_a, first.coords_a) and np.array_equal(s.coords_b, first.coords_b)
        for s in surfaces
    )


def _draw_panel(
    ax: Axes,
    surface: Any,
    grid: np.ndarray,
    scale: ColorScale,
    style: str,
    trajectory: bool,
    extend: str,
) -> Any:
    """Draw one surface; return the mappable whose colors the colorbar shows."""
    a = np.asarray(surface.coords_a, dtype=float)
    b = np.asarray(surface.coords_b, dtype=float)
    norm = scale.norm()
    # Values beyond the scale (above a --vmax cap, or <= 0 on a forced log scale) take
    # the end colors instead of leaving holes; NaN stays NaN (np.clip keeps it): a gap.
    shown = np.ma.masked_invalid(np.clip(grid, scale.levels[0], scale.levels[-1]))
    if style == "surface3d":
        return _draw_surface3d(ax, a, b, shown, scale)
    if style == "heatmap":
        mappable = ax.pcolormesh(a, b, shown, cmap=COLORMAP, norm=norm, shading="nearest")
        mappable.set_rasterized(True)  # one cell per point: a vector file stays small
    else:
        mappable = ax.contourf(
            a, b, shown, levels=scale.levels, cmap=COLORMAP, norm=norm, extend=extend
        )
        # Lines at the interior levels only: the end levels would trace clipped plateaus.
        ax.contour(a, b, shown, levels=scale.levels[1:-1], colors="k", linewidths=0.3, alpha=0.6)
    ax.plot(0.0, 0.0, marker="+", color="white", markersize=5, markeredgewidth=0.8)
    traj = getattr(surface, "trajectory", None)
    if trajectory and traj is not None and len(traj):
        traj = np.asarray(traj, dtype=float)
        ax.plot(
            traj[:, 0],
            traj[:, 1],
            color=TRAJECTORY_COLOR,
            marker="o",
            markersize=2,
            linewidth=0.9,
            label="training trajectory",
        )
        ax.plot(traj[-1, 0], traj[-1, 1], marker="*", color=TRAJECTORY_COLOR, markersize=6)
        ax.legend(loc="upper right", frameon=True, framealpha=0.8, handlelength=1.5)
    ax.set_xlim(a.min(), a.max())
    ax.set_ylim(b.min(), b.max())
    return mappable


def _draw_surface3d(ax: Any, a: np.ndarray, b: np.ndarray, shown: Any, scale: ColorScale) -> Any:
    """A 3-D surface of ``shown`` (ny, nx) at full grid resolution, colored by ``scale``."""
    x, y = np.meshgrid(a, b)
    z = shown.filled(np.nan)  # NaN: matplotlib leaves those faces out (a gap)
    lo, top = scale.levels[0], scale.levels[-1]
    if scale.log:
        z = np.log10(z)
        vmin, vmax = math.log10(lo), math.log10(top)
    else:
        vmin, vmax = lo, top
    surface = ax.plot_surface(
        x,
        y,
        z,
        cmap=COLORMAP,
        vmin=vmin,
        vmax=vmax,
        rcount=len(b),  # every grid point: the default (50) would resample the grid
        ccount=len(a),
        linewidth=0,
        antialiased=False,
    )
    # Thousands of facets: as vector paths PDF viewers draw hairline seams between them
    # and the file grows; a 300 dpi bitmap inside the vector axes avoids both.
    surface.set_rasterized(True)
    ax.set_zlim(vmin, vmax)
    ax.zaxis.set_major_locator(ticker.MaxNLocator(5, integer=scale.log))  # decades if log
    if scale.log:  # z is log10(value): label the ticks with the values themselves
        ax.zaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"$10^{{{v:.0f}}}$"))
    ax.view_init(elev=30, azim=-60)  # matplotlib's default view, stated so it is remade
    ax.tick_params(pad=-2)
    # The colorbar shows the value itself (log-scaled when the z axis is log10).
    return cm.ScalarMappable(norm=scale.norm(), cmap=COLORMAP)
