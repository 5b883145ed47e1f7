"""kdfast: fused knowledge-distillation losses for extreme label spaces.

The ops are registered under ``torch.ops.kdfast`` by the C++ extension ``kdfast._C``;
this package adds the Python API around them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import ops, reference  # noqa: F401  (ops loads the extension and registers fakes/autograd)
from .losses import DistillationLoss, distillation_loss

__all__ = ["DistillationLoss", "distillation_loss", "ops", "reference", "__version__"]
