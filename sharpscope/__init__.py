"""sharpscope: the sharpness of neural-network minima.

Train with SAM or SGD, measure worst-case sharpness and Hessian spectra, and draw
loss landscapes, all as functions of one objective L(w) (see DESIGN.md).
"""

from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .data import Dataset, load_dataset
from .errors import SharpscopeError
from .models import build_model, model_spec
from .objective import Objective

__version__ = "0.1.0"

__all__ = [
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
