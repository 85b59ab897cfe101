"""sharpscope: the sharpness of neural-network minima.

Train with SAM or SGD, measure worst-case sharpness and Hessian spectra, and draw
loss landscapes, all as functions of one objective L(w) (see docs/design.md).
"""

from . import figures, losses, stats
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .compare import compare_checkpoints
from .data import Dataset, load_dataset
from .demo import demo
from .directions import random_direction
from .errors import SharpscopeError
from .grid import interpolation, surface_1d, surface_2d
from .hessian import hessian_density, hessian_eigenvalues, hessian_trace
from .landscape import interpolation_for_checkpoints, landscape, landscape_for_checkpoint
from .measure import format_table, measure, measure_checkpoint
from .models import build_model, model_spec
from .objective import Objective
from .plots import plot_1d, plot_2d
from .sam import GSAM, SAM, bn_running_stats_frozen, rho_from_lr
from .sharpness import average_sharpness, sharpness
from .surface import Surface, landscape_summary, load_surface, summarize_draws
from .train import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "figures",
    "losses",
    "stats",
    "GSAM",
    "SAM",
    "TrainConfig",
    "bn_running_stats_frozen",
    "rho_from_lr",
    "train",
    "average_sharpness",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "format_table",
    "measure",
    "measure_checkpoint",
    "Surface",
    "interpolation",
    "interpolation_for_checkpoints",
    "landscape",
    "landscape_for_checkpoint",
    "load_surface",
    "landscape_summary",
    "summarize_draws",
    "random_direction",
    "surface_1d",
    "surface_2d",
    "plot_1d",
    "plot_2d",
    "compare_checkpoints",
    "demo",
    "sharpness",
    "Dataset",
    "Objective",
    "SharpscopeError",
    "build_model",
    "load_checkpoint",
    "load_dataset",
    "model_spec",
    "read_checkpoint",
    "save_checkpoint",
]
