"""sharpscope: the sharpness of neural-network minima.

Train with SAM or SGD, measure worst-case sharpness and Hessian spectra, and draw
loss landscapes, all as functions of one objective L(w) (see DESIGN.md).
"""

from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .data import Dataset, load_dataset
from .errors import SharpscopeError
from .hessian import hessian_density, hessian_eigenvalues, hessian_trace
from .measure import measure, measure_checkpoint
from .models import build_model, model_spec
from .objective import Objective
from .sam import GSAM, SAM, bn_running_stats_frozen, rho_from_lr
from .sharpness import average_sharpness, sharpness
from .train import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
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
    "measure",
    "measure_checkpoint",
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
