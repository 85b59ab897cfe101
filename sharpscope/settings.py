"""The settings of the analyses: one frozen dataclass per command, each default once, each
check in ``__post_init__``.

- :class:`EvaluationSettings`: which examples L(w) is evaluated on (shared by all);
- :class:`MeasureSettings`: ``sharpscope measure`` and :func:`sharpscope.measure.measure`;
- :class:`LandscapeSettings` and :class:`InterpolationSettings`: ``sharpscope landscape``;
- :class:`CompareSettings`: ``sharpscope compare`` and ``demo``;
- :class:`Loading`: how a checkpoint is rebuilt (the user's names for its code and data).

The command line builds these from its arguments before any work, the library functions
take them (or the keywords that build them), and every result records
``dataclasses.asdict`` of the settings that made it. Where an analyzer checks its own
options (:func:`sharpscope.sharpness.check_sharpness_options`, ...), the settings call
that same check: each rule is written once. (Training has
:class:`~sharpscope.train_config.TrainConfig`.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .checks import is_whole
from .directions import DIRECTIONS, NORMALIZATIONS
from .errors import SharpscopeError
from .grid import DISTRIBUTE, check_grid_points
from .hessian import check_eigenvalue_options, check_trace_samples
from .objective import DEFAULT_BATCH_SIZE, PARAM_FILTERS, ParamFilter
from .sharpness import check_average_samples, check_sharpness_options

SPLITS = ("train", "test")
# 1024 fixed examples (or all if fewer): a top eigenvalue from a batch of 128 can be 10x
# off (PyHessian issue 5; stable near 4096), and 1024 keeps a CPU measurement in seconds.
DEFAULT_SAMPLES = 1024
DEFAULT_RHOS = (0.05,)  # SAM's default radius (Foret et al. 2021)
DEFAULT_STEPS = 20  # APGD steps (Andriushchenko et al. 2023, Sec. 3)
DEFAULT_AVERAGE_SAMPLES = 100  # Monte Carlo draws (Andriushchenko et al. 2023's code)
DEFAULT_TRACE_SAMPLES = 100  # PyHessian's trace budget (maxIter=100)
DEFAULT_EIG_TOL = 1e-4  # relative residual of eigenpairs (benchmarks/bench_hessian.py)
# Li et al. (2018), Figs. 1-6 and their code's examples: [-1, 1] with 51 points per axis.
DEFAULT_RANGE = (-1.0, 1.0)
DEFAULT_POINTS = 51
# Direction draws: indices of seeded Gaussian draws, two per draw; the cap only keeps the
# index a plain integer (no analysis needs more than a handful of draws).
MAX_DRAW = 10**6
# Direction draws per checkpoint when groups of runs are compared: enough for a standard
# error, few enough that a curve per draw stays cheap next to the measurements.
DEFAULT_DRAWS = 3
# The 2-D surfaces of the direction draws: 11 x 11 points on the plotted range (step 0.2
# on [-1, 1], the corners included) estimate a plane's mean and maximum rise at 1/20 of
# the picture's 51 x 51 evaluations (0.8 s against 18 s for the demo's CNN on 512
# examples, 2 CPU cores); 0 draws no 2-D surfaces beyond the picture.
DRAW_POINTS_2D = 11
# Goodfellow et al. (2015) and Li et al. (2018, Fig. 2) plot t in [-0.5, 1.5]; 401
# points as in the 1-D interpolation example of Li et al.'s code (tomgoldstein/
# loss-landscape, README: --x=-0.5:1.5:401). Its step 0.005 puts t = 0 and t = 1 on the
# grid exactly.
INTERPOLATION_RANGE = (-0.5, 1.5)
INTERPOLATION_POINTS = 401
# compare --quick: a smoke run (CI, a first look) in seconds: coarse grids, few examples.
QUICK = {"points": 21, "points_2d": 21, "samples": 256, "trace_samples": 20}


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise SharpscopeError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}")


def check_range(value: Any, name: str = "range", auto: bool = False) -> tuple[float, float] | str:
    """(LOW, HIGH) as floats, finite with LOW < HIGH; or "auto" where ``auto`` allows it."""
    if auto and value == "auto":
        return "auto"
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        also = " or 'auto'" if auto else ""
        raise SharpscopeError(f"{name} must be (LOW, HIGH){also}, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise SharpscopeError(f"{name}: need finite LOW < HIGH, got {low:g} {high:g}")
    return low, high


def _positive(name: str, value: Any, low: int = 1, none: bool = False) -> None:
    if not (is_whole(value, low) or (none and value is None)):
        what = {0: ">= 0", 1: "positive"}.get(low, f"at least {low}")
        raise SharpscopeError(f"{name} must be {what} (a whole number), got {value!r}")


@dataclass(frozen=True)
class EvaluationSettings:
    """Which examples L(w) is evaluated on: ``samples`` examples of ``split`` (a fixed
    subset drawn with ``seed``; None or more than there are: all of them), in forward
    passes of ``batch_size``. ``seed`` also seeds an analysis's random draws."""

    split: str = "train"
    samples: int | None = DEFAULT_SAMPLES
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("split", self.split, SPLITS)
        _positive("samples", self.samples, none=True)
        _positive("batch size", self.batch_size)
        if not is_whole(self.seed, 0, 2**63 - 1):
            raise SharpscopeError(f"seed must be in 0 .. 2^63 - 1, got {self.seed!r}")


@dataclass(frozen=True)
class MeasureSettings(EvaluationSettings):
    """Every number ``measure`` reports: worst-case sharpness at each of ``rhos`` (APGD,
    ``steps`` x ``restarts``, optionally ``adaptive`` with ``eta`` and m-sharpness ``m``),
    average-case sharpness (``average``), the top ``eigs`` Hessian eigenvalues (and the
    ``smallest``), the trace (``trace_samples`` probes) and the density, on the
    parameters ``param_filter`` selects. ``subsets`` > 1: the sharpness at the first rho
    and the top eigenvalue again on that many disjoint sets of ``samples`` examples
    each, reported as mean ± standard error: the sampling error of the numbers."""

    rhos: tuple[float, ...] = DEFAULT_RHOS
    norm: str = "l2"
    adaptive: bool = False
    eta: float = 0.0
    m: int | None = None
    steps: int = DEFAULT_STEPS
    restarts: int = 1
    average: bool = False
    average_samples: int = DEFAULT_AVERAGE_SAMPLES
    eigs: int = 1
    smallest: bool = False
    eig_method: str = "lanczos"
    eig_tol: float = DEFAULT_EIG_TOL
    trace: bool = True
    trace_samples: int = DEFAULT_TRACE_SAMPLES
    density: bool = False
    param_filter: str = "all"
    subsets: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "rhos", tuple(self.rhos))  # JSON and lists come in too
        for rho in self.rhos:
            check_sharpness_options(rho, self.norm, self.steps, self.restarts, self.eta, self.m)
        if self.average:
            check_average_samples(self.average_samples)
        _positive("eigs", self.eigs, low=0)
        if self.smallest and self.eigs == 0:
            raise SharpscopeError("smallest eigenvalues asked for with eigs 0: give eigs >= 1")
        if self.eigs:
            check_eigenvalue_options(
                self.eig_method, "smallest" if self.smallest else "largest", self.eig_tol
            )
        if self.trace:
            check_trace_samples(self.trace_samples)
        check_choice("parameter filter", self.param_filter, PARAM_FILTERS)
        _positive("subsets", self.subsets)
        if self.subsets > 1 and self.samples is None:
            raise SharpscopeError("subsets need a number of samples per subset: give samples")


@dataclass(frozen=True)
class SurfaceSettings(EvaluationSettings):
    """What every surface shares: BatchNorm statistics recomputed at every point
    (``bn_recalibrate``) or the model's own, the parameters that move
    (``param_filter``), vmap batching (``batched``: True, False or None = automatic),
    the split over torchrun processes (``distribute``) and a legend ``label``."""

    bn_recalibrate: bool = False
    param_filter: ParamFilter = "all"
    batched: bool | None = None
    distribute: str = "points"
    label: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not callable(self.param_filter):  # a callable selects by hand (objective.py)
            check_choice("parameter filter", self.param_filter, PARAM_FILTERS)
        check_choice("distribute", self.distribute, DISTRIBUTE)


@dataclass(frozen=True)
class LandscapeSettings(SurfaceSettings):
    """A 1-D or 2-D surface L(w + a d1 [+ b d2]) around one checkpoint.

    ``points``: per axis, or (nx, ny); ``range``: (low, high) for every axis, "auto", or
    None ((-1, 1) for random directions as Li et al. 2018, "auto" for Hessian and PCA
    directions, whose unit-norm vectors have no natural scale). ``directions``: "filter",
    "layer", "none" (normalizations of seeded Gaussian directions), "hessian" or "pca"
    (of the run in ``trajectory``, default the checkpoint's folder). ``draw``: which
    draw of random directions, on the same examples: draw k uses Gaussian draws 2k and
    2k + 1 of ``seed`` (draw 0: d1 and d2 are draws 0 and 1), so landscapes over several
    draws show how much one picture depends on its directions.
    """

    dim: int = 1
    points: int | tuple[int, int] = DEFAULT_POINTS
    range: tuple[float, float] | str | None = None
    directions: str = "filter"
    orthogonalize: bool = False
    include_1d: bool = False
    trajectory: str | None = None
    save_directions: bool = False
    draw: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_whole(self.draw) or not 0 <= self.draw <= MAX_DRAW:
            raise SharpscopeError(
                f"draw must be a whole number in 0..{MAX_DRAW}, got {self.draw!r}"
            )
        if self.draw and self.directions not in NORMALIZATIONS:
            raise SharpscopeError("draw applies to random directions (filter, layer, none)")
        if self.dim not in (1, 2) or isinstance(self.dim, bool):
            raise SharpscopeError(f"dim must be 1 or 2, got {self.dim!r}")
        if isinstance(self.points, list):
            object.__setattr__(self, "points", tuple(self.points))
        points = self.points if isinstance(self.points, tuple) else (self.points,)
        if len(points) not in (1, 2) or (len(points) == 2 and self.dim != 2):
            raise SharpscopeError(f"points: one number, or NX NY with dim 2; got {self.points}")
        check_grid_points(*(points * self.dim if len(points) == 1 else points))
        check_choice("directions", self.directions, DIRECTIONS)
        if self.range is not None:
            object.__setattr__(self, "range", check_range(self.range, auto=True))
        if self.trajectory is not None and self.directions != "pca":
            raise SharpscopeError("a trajectory applies to directions 'pca' only")
        if self.orthogonalize and self.dim != 2:
            raise SharpscopeError("orthogonalize applies to 2-D landscapes (two directions)")

    @property
    def grid(self) -> tuple[int, int]:
        """(nx, ny): points along d1 and d2 (ny = 1 for a curve)."""
        if isinstance(self.points, tuple):
            return int(self.points[0]), int(self.points[1])
        return self.points, self.points if self.dim == 2 else 1

    @property
    def resolved_range(self) -> tuple[float, float] | str:
        """The range to use: the given one, or the default for the directions."""
        if self.range is not None:
            return self.range
        return "auto" if self.directions not in NORMALIZATIONS else DEFAULT_RANGE


@dataclass(frozen=True)
class InterpolationSettings(SurfaceSettings):
    """The curve L((1 - t) w_A + t w_B) between two checkpoints, ``points`` values of t on
    ``range``; BatchNorm statistics interpolated too with ``include_buffers``; the two
    models' names ``labels`` (default: their optimizers)."""

    points: int = INTERPOLATION_POINTS
    range: tuple[float, float] = INTERPOLATION_RANGE
    include_buffers: bool = False
    labels: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_grid_points(self.points)
        object.__setattr__(self, "range", check_range(self.range))
        if self.include_buffers and self.bn_recalibrate:
            raise SharpscopeError("interpolate BatchNorm statistics or recalibrate them, not both")
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(self.labels))


@dataclass(frozen=True)
class CompareSettings(EvaluationSettings):
    """Two minima side by side: the interpolation (``points`` on
    ``interpolation_range``), 1-D curves (``points`` on ``range``) and 2-D surfaces
    (``points_2d`` per axis) along ``directions``, and the measure table (``measure``;
    its trace on ``trace_samples`` probes). ``draws``: 1-D curves of every checkpoint
    along that many direction draws, and 2-D surfaces of ``draw_points_2d`` per axis
    (0: none), for statistics over draws (and seeds)."""

    points: int = DEFAULT_POINTS
    points_2d: int = DEFAULT_POINTS
    range: tuple[float, float] = DEFAULT_RANGE
    interpolation_range: tuple[float, float] = INTERPOLATION_RANGE
    directions: str = "filter"
    measure: bool = True
    trace_samples: int = DEFAULT_TRACE_SAMPLES
    draws: int = 1
    draw_points_2d: int = DRAW_POINTS_2D
    # What compare measures groups of runs with, for its figures over seeds: sharpness at
    # several radii (the range of Foret et al. 2021's rho grid search), the top-5
    # eigenvalues (their Fig. 3 reports lambda_max / lambda_5) and the SLQ density
    # (Ghorbani et al. 2019). Two single checkpoints get the measure table's defaults.
    rhos: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1)
    eigs: int = 5
    density: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("points", "points_2d"):
            _positive(name, getattr(self, name), low=2)
        _positive("draws", self.draws)
        if not is_whole(self.draw_points_2d, 0) or self.draw_points_2d == 1:
            raise SharpscopeError(
                f"draw_points_2d must be 0 (no 2-D draws) or at least 2, got "
                f"{self.draw_points_2d!r}"
            )
        if self.draw_points_2d:
            check_grid_points(self.draw_points_2d, self.draw_points_2d)
        object.__setattr__(self, "rhos", tuple(self.rhos))
        MeasureSettings(rhos=self.rhos, eigs=self.eigs, density=self.density)  # their checks
        if self.draws > MAX_DRAW:
            raise SharpscopeError(f"draws must be at most {MAX_DRAW}, got {self.draws}")
        check_grid_points(self.points_2d, self.points_2d)
        interpolation = check_range(self.interpolation_range, "interpolation range")
        object.__setattr__(self, "range", check_range(self.range))
        object.__setattr__(self, "interpolation_range", interpolation)
        check_choice("directions", self.directions, NORMALIZATIONS)
        check_trace_samples(self.trace_samples)


@dataclass(frozen=True)
class Loading:
    """How to rebuild a checkpoint: a plain state_dict's architecture (``model``,
    ``model_options``) and data set (``data``), the model factory a checkpoint names
    (allowed only if ``model`` names it too, or ``trust_code``), and where CIFAR data lies
    (``data_dir``; fetched only with ``download``). See
    :func:`sharpscope.checkpoint.load_model_and_data`."""

    model: str | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    data_dir: str | None = None
    download: bool = False
    trust_code: bool = False

    def keywords(self) -> dict[str, Any]:
        """The keywords of :func:`~sharpscope.checkpoint.load_model_and_data`."""
        return dataclasses.asdict(self)


S = TypeVar("S")


def settings_from(kind: type[S], settings: S | None, keywords: dict[str, Any]) -> S:
    """``settings`` with ``keywords`` on top, or ``kind(**keywords)``: how every library
    function takes a settings object or the keywords that build one. An unknown keyword
    is refused in one line."""
    known = {f.name for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
    unknown = sorted(set(keywords) - known)
    if unknown:
        raise SharpscopeError(f"unknown {kind.__name__} option(s): {', '.join(unknown)}")
    if settings is None:
        return kind(**keywords)
    return dataclasses.replace(settings, **keywords) if keywords else settings  # type: ignore[type-var]


def split_keywords(keywords: dict[str, Any]) -> tuple[dict[str, Any], Loading]:
    """``keywords`` without :class:`Loading`'s fields, and the Loading those make."""
    names = {f.name for f in dataclasses.fields(Loading)}
    loading = Loading(**{k: v for k, v in keywords.items() if k in names and v is not None})
    return {k: v for k, v in keywords.items() if k not in names}, loading
